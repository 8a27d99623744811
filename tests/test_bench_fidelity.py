"""bench.emulator_fidelity's quick mode: pre-alignment moves the emulator towards the full
model (the KL falls from step 0) and the JSON carries every measured step with its
intervals."""

import json
from pathlib import Path

from bench.emulator_fidelity import main


def test_prealignment_reduces_the_emulators_kl(tmp_path: Path) -> None:
    target = tmp_path / "fidelity.json"
    main(["--model", "tiny-llama", "--betas", "0.5", "--steps", "2", "--every", "1",
          "--texts", "4", "--json", str(target)])  # fmt: skip
    rows = json.loads(target.read_text())["rows"]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[-1]["public_kl"] < rows[0]["public_kl"]
    assert rows[-1]["task_kl"] < rows[0]["task_kl"]
    assert rows[0]["task_kl_ci_low"] <= rows[0]["task_kl"] <= rows[0]["task_kl_ci_high"]
    assert {"public_top1_ci_low", "public_top1_ci_high"} <= rows[0].keys()
