"""bfloat16 frozen weights with gradient checkpointing and accumulation, through `flwr run`,
for FedIT (LoRA on the whole model); FedBiOT's bfloat16 run (server distillation, compressed
client model) is the one tests/test_outputs.py checks."""

from __future__ import annotations

import json
import math
from pathlib import Path

from safetensors import safe_open

from tests.flower_runtime import LocalFederation, tiny_run_config


def test_bfloat16_fedit_run_with_checkpointing_and_accumulation_finishes(
    federation: LocalFederation, tmp_path: Path
) -> None:
    config = tiny_run_config(
        tmp_path,
        "run",
        method="fedit",
        dtype="bfloat16",
        gradient_checkpointing=True,
        grad_accum_steps=2,
        eval_every=0,
    )
    rows = federation.run_to_end(config, supernodes=2)
    assert "Frozen weights in bfloat16, LoRA in float32" in federation.last_output
    last = rows[-1]
    assert math.isfinite(last["train_loss"]) and last["clients_failed"] == 0
    assert last["client_quantized_bits"] == 16  # the nodes' frozen weights were bfloat16
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "config.json").read_text())["run_config"]["dtype"] == "bfloat16"
    # The merged AdapFu keeps the run's dtype; its PEFT adapter is the float32 LoRA.
    assert json.loads((run_dir / "adapfu" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(run_dir / "adapfu" / "peft" / "adapter_model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float32"}  # noqa: SIM118
