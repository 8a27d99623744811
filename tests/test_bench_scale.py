"""bench/scale.py's quick mode on the tiny model: one real federation of twenty simulated
SuperNodes, two sampled a round, each training the partition Flower's simulation engine gives
it (the run config says num-partitions=2); the nodes' shared store ends with one
copy of the weights, sent once, while a deployment would download it once per node served."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from bench.scale import main


@pytest.mark.usefixtures("shared_ray")  # its federations join one Ray head
def test_scale_quick_mode_keeps_one_copy_of_the_weights_for_all_nodes(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    argv = ["--quick", "--model", "tiny-llama", "--nodes", "20", "--per-round", "2",
            "--rounds", "3", "--out", str(tmp_path), "--json", str(out)]  # fmt: skip
    [result] = main(argv)
    assert result["nodes"] == 20 and result["clients_per_round"] == [2, 2, 2]
    assert result["clients_failed"] == 0
    run_dir = tmp_path / "runs" / "n20"
    fields = json.loads((run_dir / "config.json").read_text())
    assert fields["run_config"]["num-partitions"] == 2  # tiny_run_config's; the nodes' wins
    with open(run_dir / "communication.csv", newline="") as f:
        trained = [row for row in csv.DictReader(f) if int(row["round"]) >= 1]
    assert len(trained) == 6 and {row["num_partitions"] for row in trained} == {"20"}
    for server_round in ("1", "2", "3"):  # two nodes, two partitions of the twenty
        ids = {int(r["partition_id"]) for r in trained if r["round"] == server_round}
        assert len(ids) == 2 and ids <= set(range(20))
    # Flower's engine numbers the nodes' partitions 0..19: over three rounds, some above 1.
    assert max(int(row["partition_id"]) for row in trained) >= 2
    weights = fields["compressed_model_bytes"]
    # Every node served counts one download; one node's store received the bytes.
    served = result["weights_download_bytes"] / weights
    assert served == int(served) and 2 <= served <= 6  # at most 2 new nodes a round
    assert weights <= result["weights_sent_bytes"] < 1.1 * weights
    # One copy on disk (safetensors plus tokenizer and config), not one per node.
    assert weights <= result["cache_disk_bytes"] < 1.5 * weights
    assert not (tmp_path / "runs" / "n20-node-cache").exists()  # removed after measuring
    document = json.loads(out.read_text())
    assert document["results"] == [result] and document["settings"]["num-server-rounds"] == 3
    assert document["command"] == "python -m bench.scale " + " ".join(argv)
    # Resumed: the finished N is read back, not run again.
    assert main(argv) == [result]
