"""bench/client_cost.py on the tiny model: each layout's worker holds the blocks its method's
client holds, trains the LoRA it should, and counts the bytes of the records it would send."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_client_cost_counts_what_each_client_layout_holds_and_sends(tmp_path: Path) -> None:
    out = tmp_path / "cost.json"
    command = [sys.executable, "bench/client_cost.py", "--model", "tiny-llama", "--steps", "1",
               "--repeats", "1", "--seq-length", "32", "--json", str(out)]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    document = json.loads(out.read_text())
    rows = document["rows"]
    # tiny-llama has 8 blocks. FedBiOT (s=2, beta=0.5): 2 adapter blocks on top of half of the
    # other 6; FedOT: 2 + 2 adapter blocks around half of the 4 between; FedIT: all 8.
    assert [rows[k]["kept_blocks"] for k in ("fedbiot", "fedot", "full")] == [5, 6, 8]
    per_block = rows["full"]["trainable_params"] // 8
    assert rows["full"]["trainable_params"] == 8 * per_block
    assert rows["fedbiot"]["trainable_params"] == 2 * per_block
    assert rows["fedot"]["trainable_params"] == 4 * per_block
    for row in rows.values():
        # The upload is the float32 LoRA plus the record's keys and array headers.
        assert 4 * row["trainable_params"] < row["bytes_up"] < 1.1 * 4 * row["trainable_params"]
    fedbiot, fedot, full = rows["fedbiot"], rows["fedot"], rows["full"]
    assert fedbiot["gflop_per_token"] < fedot["gflop_per_token"] < full["gflop_per_token"]
    assert (
        fedbiot["bytes_model_download"]
        < fedot["bytes_model_download"]
        < full["bytes_model_download"]
    )
    assert document["summary"]["upload_fraction"] == fedbiot["bytes_up"] / full["bytes_up"]
    assert document["methods"]["offsite"] == "fedot" and document["methods"]["central"] == "full"
    assert "FedBiOT / full-model LoRA" in done.stdout
