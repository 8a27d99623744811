"""Flower's simulation on an existing Ray cluster (scripts/ray_cluster.sh): the session's Ray
head, started by the script (tests/conftest.py), a SuperLink given its RAY_ADDRESS, and a
real ``flwr run`` whose simulated SuperNodes run as actors of that cluster, not of a Ray
instance of its own."""

from pathlib import Path

from tests.flower_runtime import LocalFederation, RayHead, tiny_run_config


def _registered(head: RayHead) -> tuple[int, int]:
    """Jobs (drivers) and actors the head's GCS has registered so far."""
    text = (head.temp_dir / "session_latest" / "logs" / "gcs_server.out").read_text()
    return text.count("Registering job"), text.count("Registering actor")


def test_simulation_runs_its_supernodes_on_an_existing_ray_cluster(
    federation: LocalFederation, session_ray: RayHead, tmp_path: Path
) -> None:
    jobs, actors = _registered(session_ray)
    rows = federation.run_to_end(tiny_run_config(tmp_path, "on-cluster"), supernodes=2)
    assert rows[-1]["clients_sampled"] == 2 and rows[-1]["clients_failed"] == 0
    # The run's driver registered with this cluster and its SuperNodes' actors ran there.
    now_jobs, now_actors = _registered(session_ray)
    assert now_jobs == jobs + 1 and now_actors > actors
    assert session_ray.process.poll() is None  # the cluster outlives the run
    port = session_ray.address.rsplit(":", 1)[1]
    assert f"Ray head on port {port}" in session_ray.log.read_text()
