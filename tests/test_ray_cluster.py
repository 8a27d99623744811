"""Flower's simulation on an existing Ray cluster (scripts/ray_cluster.sh): a Ray head started
by the script, a SuperLink given its RAY_ADDRESS, and a real ``flwr run`` whose simulated
SuperNodes run as actors of that cluster, not of a Ray instance of its own."""

from pathlib import Path

from tests.flower_runtime import local_federation, ray_head, tiny_run_config


def test_simulation_runs_its_supernodes_on_an_existing_ray_cluster(tmp_path: Path) -> None:
    log = tmp_path / "ray-head.log"
    with ray_head(log) as head:
        with local_federation(tmp_path / "home", {"RAY_ADDRESS": head.address}) as fed:
            rows = fed.run_to_end(tiny_run_config(tmp_path, "on-cluster"), supernodes=2)
        assert rows[-1]["clients_sampled"] == 2 and rows[-1]["clients_failed"] == 0
        # The run's driver registered with this cluster and its SuperNodes' actors ran there.
        text = (head.temp_dir / "session_latest" / "logs" / "gcs_server.out").read_text()
        assert "Registering job" in text and "Registering actor" in text
        assert head.process.poll() is None  # the cluster outlives the run
    port = head.address.rsplit(":", 1)[1]
    assert f"Ray head on port {port}" in log.read_text()
