"""A real deployment on loopback: SuperLink and SuperNodes as processes, TLS and SuperNode
authentication on, an unregistered SuperNode refused, FedBiOT run through `flwr run`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.flower_runtime import BIN, REPO, tiny_run_config

pytestmark = pytest.mark.xdist_group("deployment")
SCRIPT = REPO / "scripts" / "deploy_local.py"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_tls_authenticated_deployment_runs_fedbiot_and_refuses_a_stranger(tmp_path: Path) -> None:
    root = tmp_path / "deploy"
    command = [sys.executable, str(SCRIPT)]
    subprocess.run(
        [*command, "start", "--dir", str(root), "--nodes", "4", "--unregistered", "1"], check=True
    )
    pids = [int(p) for p in (root / "pids").read_text().split()]
    try:
        env = {
            **os.environ,
            "FLWR_HOME": str(root / "flwr-home"),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        config = tiny_run_config(
            tmp_path,
            "deployed",
            num_partitions=3,
            min_train_nodes=3,
            num_server_rounds=2,
            fraction_evaluate=0.0,
        )
        overrides = " ".join(
            f"{k}='{v}'" if isinstance(v, str) else f"{k}={v}" for k, v in config.items()
        )
        result = subprocess.run(
            [str(BIN / "flwr"), "run", str(REPO), "local", "--stream", "--run-config", overrides],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        rows = [
            json.loads(line)
            for line in (tmp_path / "deployed" / "metrics.jsonl").read_text().splitlines()
        ]
        assert [r["round"] for r in rows] == [0, 1, 2]
        assert all(r["clients_sampled"] == 3 and r["clients_failed"] == 0 for r in rows[1:])
        assert (tmp_path / "deployed" / "adapfu" / "config.json").is_file()
        link_log = (root / "logs" / "superlink.log").read_text()
        assert "No SuperNode found with the given public key" in link_log  # the stranger
        assert "--insecure" not in link_log  # TLS on: no insecure-mode warning
        assert "root-certificates" in (root / "flwr-home" / "config.toml").read_text()
    finally:
        subprocess.run([*command, "stop", "--dir", str(root)], check=True)
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(_alive(p) for p in pids), "every process the script started is gone"
