"""A real deployment on loopback: SuperLink and SuperNodes as processes, TLS and SuperNode
authentication on, an unregistered SuperNode refused, FedBiOT run through `flwr run`."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.flower_runtime import BIN, REPO, app_dir, flower_env, tiny_run_config

pytestmark = pytest.mark.xdist_group("deployment")
SCRIPT = REPO / "scripts" / "deploy_local.py"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _rounds_recorded(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_tls_authenticated_deployment_survives_a_killed_client(tmp_path: Path) -> None:
    """Three registered SuperNodes (node 0 on its own data file) and a stranger. Node 2 is
    killed after the round-1 messages went out: round 1 completes with the other two and
    counts the failure; node 2 restarts with its key, gets the weights again and trains in
    round 2."""
    root = tmp_path / "deploy"
    own_data = tmp_path / "node0.jsonl"
    own_data.write_text(
        "".join(
            json.dumps({"instruction": f"Add {i} and {i}.", "output": f"{i} + {i} = {2 * i}"})
            + "\n"
            for i in range(12)
        )
    )
    command = [sys.executable, str(SCRIPT)]
    start = ["start", "--dir", str(root), "--nodes", "4", "--unregistered", "1"]
    subprocess.run([*command, *start, "--node", f"0:data-file='{own_data}'"], check=True)
    pids = [int(p) for p in (root / "pids").read_text().split()]
    run_dir = tmp_path / "deployed"
    try:
        env = flower_env(root / "flwr-home")
        config = tiny_run_config(
            tmp_path,
            "deployed",
            num_partitions=3,
            min_train_nodes=3,
            num_server_rounds=2,
            fraction_evaluate=0.0,
            eval_every=2,
            round_timeout=300.0,
        )
        overrides = " ".join(
            f"{k}='{v}'" if isinstance(v, str) else f"{k}={v}" for k, v in config.items()
        )
        run = subprocess.Popen(
            [
                str(BIN / "flwr"),
                "run",
                str(app_dir()),
                "local",
                "--stream",
                "--run-config",
                overrides,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        audit = run_dir / "sent_arrays.jsonl"
        _wait_for(lambda: _rounds_recorded(audit) >= 3, 300, "the round-1 train messages")
        subprocess.run([*command, "kill-node", "--dir", str(root), "--node", "2"], check=True)
        metrics = run_dir / "metrics.jsonl"
        _wait_for(lambda: _rounds_recorded(metrics) >= 2, 300, "round 1 to complete")
        subprocess.run([*command, "start-node", "--dir", str(root), "--node", "2"], check=True)
        output, _ = run.communicate(timeout=600)
        assert run.returncode == 0, output[-3000:]
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        assert [r["round"] for r in rows] == [0, 1, 2]
        assert rows[1]["clients_sampled"] == 3 and rows[1]["clients_failed"] == 1
        assert all(r["clients_sampled"] == 3 and r["clients_failed"] == 0 for r in rows[2:])
        with open(run_dir / "communication.csv", newline="") as f:
            # A node that failed its round replied nothing, so no partition: empty cells.
            traffic = [{k: int(v) if v else None for k, v in row.items()}
                       for row in csv.DictReader(f)]  # fmt: skip
        # Each replying node's partition as its --node-config gave it (node 0, on its own
        # data file, reports partition 0): all three in the round after the restart.
        reported = {(r["partition_id"], r["num_partitions"])
                    for r in traffic if r["round"] == 2}  # fmt: skip
        assert reported == {(0, 3), (1, 3), (2, 3)}, traffic
        # A node keeps its partition from round to round (round 1: the nodes that replied).
        by_node = {r["node"]: r["partition_id"] for r in traffic if r["round"] == 2}
        first = [r for r in traffic if r["round"] == 1 and r["partition_id"] is not None]
        assert len(first) == 2 and all(by_node[r["node"]] == r["partition_id"] for r in first)
        failed = [r["node"] for r in traffic if r["round"] == 1 and r["bytes_up"] == 0]
        assert len(failed) == 1, traffic
        again = [r for r in traffic if r["round"] == 2 and r["node"] == failed[0]]
        assert again and again[0]["bytes_up"] > 0, "the killed node trains again"
        assert again[0]["bytes_model_download"] > 0, "and gets the frozen weights again"
        assert (run_dir / "adapfu" / "config.json").is_file()
        link_log = (root / "logs" / "superlink.log").read_text()
        assert "No SuperNode found with the given public key" in link_log  # the stranger
        assert "--insecure" not in link_log  # TLS on: no insecure-mode warning
        assert "root-certificates" in (root / "flwr-home" / "config.toml").read_text()
        node0 = (root / "nodes" / "0.json").read_text()
        assert "data-file" in node0 and str(own_data) in node0
    finally:
        subprocess.run([*command, "stop", "--dir", str(root)], check=True)
    pids += [int(f.read_text()) for f in (root / "nodes").glob("*.pid")]
    deadline = time.monotonic() + 20
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(_alive(p) for p in pids), "every process the script started is gone"
