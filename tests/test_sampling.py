"""Flower's sampling and timeouts as the run config sets them, through ``flwr run``:
``fraction-train`` < 1 trains a different subset of the nodes each round, and
``round-timeout`` ends a round whose clients have not answered (a round without any update
then stops the run, and the README's wrapper exits non-zero)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from tests.flower_runtime import LocalFederation, tiny_run_config
from tests.test_run_checked import run_wrapped

pytestmark = pytest.mark.xdist_group("sampling")


def test_fraction_train_samples_half_of_the_nodes_each_round(
    federation: LocalFederation, tmp_path: Path
) -> None:
    # FedAvgM's end-to-end run (its server momentum is checked in test_algorithms.py): the
    # sampling must not depend on the aggregation.
    config = tiny_run_config(tmp_path, "half", num_partitions=4, fraction_train=0.5,
                             min_train_nodes=2, num_server_rounds=6, eval_tasks="",
                             algorithm="fedavgm")  # fmt: skip
    rows = federation.run_to_end(config, supernodes=4)
    assert [r["clients_sampled"] for r in rows[1:]] == [2] * 6
    assert all(math.isfinite(r["train_loss"]) and r["clients_failed"] == 0 for r in rows[1:])
    run_config = json.loads((tmp_path / "half" / "config.json").read_text())["run_config"]
    assert run_config["algorithm"] == "fedavgm"
    with open(tmp_path / "half" / "communication.csv") as f:
        per_node = list(csv.DictReader(f))
    # Every node is sent the model and evaluates; the trained ones send LoRA back.
    trained = [
        {n["node"] for n in per_node if int(n["round"]) == r and int(n["bytes_up"]) > 0}
        for r in range(1, 7)
    ]
    assert [len(nodes) for nodes in trained] == [2] * 6
    # Not the same two nodes every round: node ids are new each run, so the draw is random;
    # six rounds make a false alarm (the same pair 6 times) a 1-in-7,776 event, not 1 in 36.
    assert len(set().union(*trained)) > 2, trained


def test_a_round_timeout_ends_a_round_nobody_answered_in_time(
    federation: LocalFederation, tmp_path: Path
) -> None:
    # Round 1 ships the model and trains 40 steps: far more than the one second allowed.
    config = tiny_run_config(tmp_path, "late", round_timeout=1.0, local_steps=40,
                             eval_tasks="")  # fmt: skip
    wrapped = run_wrapped(federation, config, 2, timeout=600)
    output = wrapped.output
    assert wrapped.returncode == 1, output
    assert "round 1: no client update" in output, output
    assert "ended as finished:failed" in wrapped.stderr, output
    assert not (tmp_path / "late" / "adapfu").exists()
    assert wrapped.seconds < 300, output
