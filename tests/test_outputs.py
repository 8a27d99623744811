"""Outputs people use elsewhere: per-round PEFT adapters (``save-every-round``), model cards
and experiment tracking (``report-to``), from one real two-round Flower simulation."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForCausalLM

from federation.run_config import ConfigError, RunConfig
from models.loading import EMBEDDED_HUB_ID, base_model_id
from server_app.tracking import check_tracking
from tests.flower_runtime import LocalFederation, tiny_run_config


@pytest.fixture(scope="module")
def run(
    federation: LocalFederation, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[dict]]:
    """FedBiOT, 2 rounds, an adapter every round, TensorBoard: the run folder and its rows."""
    out = tmp_path_factory.mktemp("outputs")
    config = tiny_run_config(
        out, "run", num_server_rounds=2, save_every_round=1, report_to="tensorboard"
    )
    return out / "run", federation.run_to_end(config, supernodes=2)


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
    run_dir, _ = run
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
    run_dir, rows = run
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
    run_dir, rows = run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train_loss")}
    expected = {r["round"]: r["train_loss"] for r in rows if r["train_loss"] is not None}
    assert sorted(logged) == sorted(expected) == [1, 2]
    for step, value in expected.items():
        assert math.isclose(logged[step], value, rel_tol=1e-6)
    assert len(events.Scalars("elapsed_s")) == len(rows)


def test_bad_output_keys_fail_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="report-to='mlflow'"):
        RunConfig.from_flower({"report-to": "mlflow"})
    with pytest.raises(ConfigError, match="save-every-round"):
        RunConfig.from_flower({"save-every-round": -1})
    with pytest.raises(ConfigError, match="save-every-round: method=kdfed"):
        RunConfig.from_flower({"save-every-round": 1, "method": "kdfed"})


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_a_missing_tracking_package_names_the_key_and_the_extra() -> None:
    with pytest.raises(ConfigError, match=r"report-to='wandb'.*pip install '\.\[wandb\]'"):
        check_tracking("wandb")


def test_adapters_name_a_base_that_means_something_elsewhere(tmp_path: Path) -> None:
    assert base_model_id("smollm2-135m") == EMBEDDED_HUB_ID
    assert base_model_id("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    assert base_model_id(str(tmp_path)) == str(tmp_path.resolve())
