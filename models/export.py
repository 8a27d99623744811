"""Save AdapEmu and AdapFu: a merged model directory plus the PEFT adapter beside it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from models.fedbiot_models import FedBiOTModels
from models.lora import LoraModel


def export_lora_model(
    lora: LoraModel, tokenizer: PreTrainedTokenizerBase, out: Path, note: dict
) -> Path:
    """``out/`` loads with ``AutoModelForCausalLM.from_pretrained``; ``out/peft/`` is the
    adapter (its module names count blocks by position in this model, see ``note``)."""
    out.mkdir(parents=True, exist_ok=True)
    lora.peft.save_pretrained(out / "peft")
    (out / "peft" / "fedbiot_layout.json").write_text(json.dumps(note, indent=2))
    merged = copy.deepcopy(lora.peft).merge_and_unload()
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def export_outputs(models: FedBiOTModels, run_dir: Path) -> dict[str, Path]:
    """Write ``adapemu/`` (E∘A) and ``adapfu/`` (E*∘A with the trained adapter)."""
    layout = models.layout.to_dict()
    return {
        "adapemu": export_lora_model(
            models.compressed,
            models.tokenizer,
            run_dir / "adapemu",
            {"variant": "adapemu", "positions_are_blocks": models.layout.kept_blocks, **layout},
        ),
        "adapfu": export_lora_model(
            models.full,
            models.tokenizer,
            run_dir / "adapfu",
            {
                "variant": "adapfu",
                "positions_are_blocks": list(range(layout["num_blocks"])),
                **layout,
            },
        ),
    }
