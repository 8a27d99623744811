"""The exported adapters load as a Hugging Face user loads them and give the server's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM

from models.blocks import get_blocks
from models.export import export_lora_model, export_outputs, exports_complete
from models.fedbiot_models import FedBiOTModels
from models.layout import fedbiot_layout
from models.lora import LoraSpec
from tests.tiny import tiny


def _trained_models() -> FedBiOTModels:
    """The tiny model split as FedBiOT does (adapter 6-7, emulator 3 of blocks 0-5), with
    non-zero LoRA everywhere, so an adapter on the wrong blocks changes the logits."""
    model, tokenizer = tiny("tiny-llama")
    layout = fedbiot_layout(len(get_blocks(model)), 2, 0.5)
    models = FedBiOTModels(model, tokenizer, layout, LoraSpec(r=4, alpha=8))
    generator = torch.Generator().manual_seed(3)

    def noise(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: 0.3 * torch.randn(v.shape, generator=generator) for k, v in state.items()}

    models.set_adapter(noise(models.adapter_state()))
    models.set_emulator(noise(models.emulator_state()))
    models.compressed.peft.eval()
    models.full.peft.eval()
    return models


def test_both_outputs_load_as_a_hugging_face_user_would(tmp_path: Path) -> None:
    models = _trained_models()
    assert len(models.layout.kept_blocks) < models.layout.num_blocks
    export_outputs(models, tmp_path)
    ids = torch.randint(5, 1000, (2, 12), generator=torch.Generator().manual_seed(4))
    server = {"adapemu": models.compressed.peft, "adapfu": models.full.peft}
    with torch.no_grad():
        for variant, model in server.items():
            expected = model(input_ids=ids).logits
            peft_dir = tmp_path / variant / "peft"
            config = json.loads((peft_dir / "adapter_config.json").read_text())
            base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
            loaded = {
                "PeftModel on the named base": PeftModel.from_pretrained(base, peft_dir),
                "AutoPeftModel": AutoPeftModelForCausalLM.from_pretrained(peft_dir),
                "merged": AutoModelForCausalLM.from_pretrained(tmp_path / variant),
            }
            for how, user_model in loaded.items():
                logits = user_model.eval()(input_ids=ids).logits
                torch.testing.assert_close(
                    logits, expected, msg=lambda m, v=variant, h=how: f"{v}, {h}: {m}"
                )
    adapemu_base = tmp_path / "adapemu" / "base"
    assert (adapemu_base / "tokenizer_config.json").is_file()
    emulator = AutoModelForCausalLM.from_pretrained(adapemu_base)
    assert len(get_blocks(emulator)) == len(models.layout.kept_blocks)


def test_an_export_that_fails_midway_leaves_no_folder_that_looks_complete(tmp_path: Path) -> None:
    """The adapter is written, then the note cannot be: neither a new nor a replaced
    ``adapfu/`` may show the half-written state, and no temporary folder stays behind."""
    models = _trained_models()
    out = tmp_path / "adapfu"
    unwritable = {"variant": "adapfu", "bad": object()}  # json.dumps fails after save_pretrained
    with pytest.raises(TypeError, match="not JSON serializable"):
        export_lora_model(models.full, models.tokenizer, out, unwritable)
    assert not out.exists() and not exports_complete(tmp_path, models.has_emulator)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    export_outputs(models, tmp_path)
    assert exports_complete(tmp_path, models.has_emulator)
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(TypeError):
        export_lora_model(models.full, models.tokenizer, out, unwritable)
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapemu", "adapfu"]
