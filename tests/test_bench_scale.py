"""bench/scale.py's quick mode on the tiny model: one real federation of six simulated
SuperNodes, two sampled a round; the nodes' shared store ends with one copy of the weights,
sent once, while a deployment would download it once per node served."""

from __future__ import annotations

import json
from pathlib import Path

from bench.scale import main


def test_scale_quick_mode_keeps_one_copy_of_the_weights_for_all_nodes(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    argv = ["--quick", "--model", "tiny-llama", "--nodes", "6", "--per-round", "2",
            "--rounds", "3", "--out", str(tmp_path), "--json", str(out)]  # fmt: skip
    [result] = main(argv)
    assert result["nodes"] == 6 and result["clients_per_round"] == [2, 2, 2]
    assert result["clients_failed"] == 0
    fields = json.loads((tmp_path / "runs" / "n6" / "config.json").read_text())
    weights = fields["compressed_model_bytes"]
    # Every node served counts one download; one node's store received the bytes.
    served = result["weights_download_bytes"] / weights
    assert served == int(served) and 2 <= served <= 6
    assert weights <= result["weights_sent_bytes"] < 1.1 * weights
    # One copy on disk (safetensors plus tokenizer and config), not one per node.
    assert weights <= result["cache_disk_bytes"] < 1.5 * weights
    assert not (tmp_path / "runs" / "n6-node-cache").exists()  # removed after measuring
    document = json.loads(out.read_text())
    assert document["results"] == [result] and document["settings"]["num-server-rounds"] == 3
    assert document["command"] == "python -m bench.scale " + " ".join(argv)
    # Resumed: the finished N is read back, not run again.
    assert main(argv) == [result]
