"""Outputs people use elsewhere: per-round PEFT adapters (``save-every-round``), model cards
and experiment tracking (``report-to``), from one real two-round Flower simulation whose
frozen weights are bfloat16, with gradient checkpointing and accumulation (FedIT's bfloat16
run: tests/test_methods_e2e.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors import safe_open
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from federation.run_config import ConfigError, RunConfig
from models.loading import EMBEDDED_HUB_ID, base_model_id
from models.wire import state_bytes, state_digest
from tests.flower_runtime import LocalFederation, tiny_run_config

# One worker for the module: its run is a module fixture, made once, not once per worker.
pytestmark = pytest.mark.xdist_group("outputs")


@pytest.fixture(scope="module")
def run(
    federation: LocalFederation, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[dict], str]:
    """FedBiOT, 2 rounds, an adapter every round, TensorBoard, bfloat16 frozen weights: the
    run folder, its rows and its log."""
    out = tmp_path_factory.mktemp("outputs")
    config = tiny_run_config(out, "run", num_server_rounds=2, save_every_round=1,
                             report_to="tensorboard", dtype="bfloat16",
                             gradient_checkpointing=True, grad_accum_steps=2)  # fmt: skip
    rows = federation.run_to_end(config, supernodes=2)
    return out / "run", rows, federation.last_output


def _front_matter(card: Path) -> tuple[dict, str]:
    _, front, body = card.read_text().split("---\n", 2)
    return yaml.safe_load(front), body


def _logits(adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    """The adapter loaded as a Hugging Face user would: onto the base it names."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    with torch.no_grad():
        return PeftModel.from_pretrained(base, adapter).eval()(input_ids=ids).logits


def test_every_round_leaves_an_adapter_that_loads_onto_the_full_base(run) -> None:
    run_dir, _, _ = run
    for name in ("peft_1", "peft_2"):
        assert (run_dir / name / "adapter_model.safetensors").is_file(), name
        config = json.loads((run_dir / name / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == base_model_id("tiny-llama")
    assert not list(run_dir.glob(".*partial*")), "a temporary export folder stayed behind"
    ids = torch.randint(5, 1000, (2, 12), generator=torch.Generator().manual_seed(4))
    last, first = _logits(run_dir / "peft_2", ids), _logits(run_dir / "peft_1", ids)
    torch.testing.assert_close(last, _logits(run_dir / "adapfu" / "peft", ids))
    assert not torch.allclose(first, last), "round 1's adapter equals round 2's"


def test_model_cards_name_the_base_the_method_and_the_final_metrics(run) -> None:
    run_dir, rows, _ = run
    for folder in ("adapfu", "adapfu/peft", "adapemu", "peft_2"):
        front, body = _front_matter(run_dir / folder / "README.md")
        assert front["base_model"] == base_model_id("tiny-llama"), folder
        assert front["library_name"] == "peft"
        assert {"federated-learning", "flower", "fedbiot"} <= set(front["tags"])
        assert "openai/gsm8k" in front["datasets"]
        assert "`fedbiot`" in body and "partitioner `iid`" in body
    _, adapfu = _front_matter(run_dir / "adapfu" / "README.md")
    shown = [k for k in rows[-1] if k.startswith("eval_adapfu_") and not k.endswith("_ci_low")]
    assert shown and all(f"`{key}`" in adapfu for key in shown if not key.endswith("_ci_high"))
    ci = next(k for k in shown if f"{k}_ci_low" in rows[-1])
    assert f"{rows[-1][ci + '_ci_low']:.4g}" in adapfu
    _, adapemu = _front_matter(run_dir / "adapemu" / "README.md")
    assert "compressed emulator" in adapemu and "`base/`" in adapemu


def test_tensorboard_holds_every_metrics_row(run) -> None:
    run_dir, rows, _ = run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train_loss")}
    expected = {r["round"]: r["train_loss"] for r in rows if r["train_loss"] is not None}
    assert sorted(logged) == sorted(expected) == [1, 2]
    for step, value in expected.items():
        assert math.isclose(logged[step], value, rel_tol=1e-6)
    assert len(events.Scalars("elapsed_s")) == len(rows)


def test_a_bfloat16_run_keeps_its_dtype_and_trains_float32_lora(run) -> None:
    run_dir, rows, output = run
    assert "Frozen weights in bfloat16, LoRA in float32" in output
    last = rows[-1]
    assert math.isfinite(last["train_loss"]) and math.isfinite(last["distill_loss"])
    assert last["clients_failed"] == 0
    assert last["client_quantized_bits"] == 16  # the nodes' frozen weights were bfloat16
    assert json.loads((run_dir / "config.json").read_text())["run_config"]["dtype"] == "bfloat16"
    # The merged AdapFu keeps the run's dtype; its PEFT adapter is the float32 LoRA.
    assert json.loads((run_dir / "adapfu" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(run_dir / "adapfu" / "peft" / "adapter_model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float32"}  # noqa: SIM118


def test_a_bfloat16_run_ships_the_frozen_weights_as_bfloat16(run) -> None:
    run_dir, rows, _ = run
    fields = json.loads((run_dir / "config.json").read_text())
    # The nodes' shared store keeps it under the digest the server named.
    stored = run_dir.parent / "run-node-cache" / "weights" / fields["model_digest"]
    with safe_open(str(stored / "model.safetensors"), "pt") as f:
        weights = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert state_digest(weights) == fields["model_digest"]  # what the node checked it against
    # 2 bytes a weight on the wire, not float32's 4 (plus NumPy headers and the keys).
    raw = state_bytes(weights)
    assert raw <= fields["compressed_model_bytes"] < 1.1 * raw
    assert rows[1]["bytes_model_download"] == 2 * fields["compressed_model_bytes"]  # 2 nodes


def test_bad_output_keys_fail_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="report-to='mlflow'"):
        RunConfig.from_flower({"report-to": "mlflow"})
    with pytest.raises(ConfigError, match="save-every-round"):
        RunConfig.from_flower({"save-every-round": -1})
    with pytest.raises(ConfigError, match="save-every-round: method=kdfed"):
        RunConfig.from_flower({"save-every-round": 1, "method": "kdfed"})


def test_adapters_name_a_base_that_means_something_elsewhere(tmp_path: Path) -> None:
    assert base_model_id("smollm2-135m") == EMBEDDED_HUB_ID
    assert base_model_id("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert base_model_id(str(tmp_path)) == str(tmp_path.resolve())
