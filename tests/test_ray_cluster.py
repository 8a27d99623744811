"""Flower's simulation on an existing Ray cluster (scripts/ray_cluster.sh): a Ray head started
by the script, a SuperLink given its RAY_ADDRESS, and a real ``flwr run`` whose simulated
SuperNodes run as actors of that cluster, not of a Ray instance of its own."""

import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.flower_runtime import BIN, REPO, free_port, local_federation, tiny_run_config


def _wait_for_ray(port: int, head: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert head.poll() is None, f"ray start exited with {head.returncode}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"no Ray head on port {port}")


def test_simulation_runs_its_supernodes_on_an_existing_ray_cluster(tmp_path: Path) -> None:
    # Ray's socket paths must stay short: its files go to a short folder of their own,
    # which also keeps simulations elsewhere on the machine from joining this cluster.
    ray_dir = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
    port = free_port()
    env = {**os.environ, "RAY_TEMP_DIR": str(ray_dir), "PATH": f"{BIN}:{os.environ['PATH']}"}
    log = open(tmp_path / "ray-head.log", "w")  # noqa: SIM115 - closed in finally
    head = subprocess.Popen(
        ["bash", str(REPO / "scripts" / "ray_cluster.sh"), "head", str(port), "--num-cpus", "2",
         "--block"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        gcs_log = ray_dir / "session_latest" / "logs" / "gcs_server.out"
        _wait_for_ray(port, head)
        with local_federation(tmp_path / "home", {"RAY_ADDRESS": f"127.0.0.1:{port}"}) as fed:
            rows = fed.run_to_end(tiny_run_config(tmp_path, "on-cluster"), supernodes=2)
        assert rows[-1]["clients_sampled"] == 2 and rows[-1]["clients_failed"] == 0
        # The run's driver registered with this cluster and its SuperNodes' actors ran there.
        text = gcs_log.read_text()
        assert "Registering job" in text and "Registering actor" in text
        assert head.poll() is None  # the cluster outlives the run
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        log.close()
        subprocess.run(["rm", "-rf", str(ray_dir)], check=False)
    assert f"Ray head on port {port}" in (tmp_path / "ray-head.log").read_text()
