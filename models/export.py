"""Save AdapEmu and AdapFu: a merged model directory plus the PEFT adapter beside it.

AdapEmu's adapter counts blocks by position in the compressed model, so its frozen base (the
emulator's and adapter's original weights, without LoRA) is saved next to it as
``adapemu/base/`` and its ``adapter_config.json`` names that folder: PEFT would otherwise load
it onto the full model's first blocks without complaint. Methods without an emulator
(FedIT, central) have one trained model, the full model with LoRA: it is saved as
``adapfu/``. The local-only baseline saves each client's adapter.

Each folder is written under a temporary name beside it and renamed when complete, so a run
that dies while exporting leaves no half-written ``adapfu/`` that looks finished, and
``resume-from`` on its last checkpoint finishes the export (``exports_complete``).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from flwr.app import ArrayRecord
from transformers import PreTrainedTokenizerBase

from models.fedbiot_models import FedBiOTModels
from models.lora import LoraModel
from models.wire import from_record


@dataclass(frozen=True)
class AdapterFiles:
    """Where an export puts its adapter and what it says about it: ``adapter_dir`` inside
    the folder (``""``: the folder itself, FlowerTune's ``peft_<round>/`` layout),
    ``base_model`` for ``adapter_config.json``'s ``base_model_name_or_path`` (``""``: the
    path the model was loaded from; AdapEmu always names its ``base/``), and a model card
    (``README.md``) per variant (``adapfu``, ``adapemu``)."""

    adapter_dir: str = "peft"
    base_model: str = ""
    cards: Mapping[str, str] = field(default_factory=dict)


def export_lora_model(
    lora: LoraModel,
    tokenizer: PreTrainedTokenizerBase,
    out: Path,
    note: dict,
    merged: bool = True,
    with_base: bool = False,
    files: AdapterFiles = AdapterFiles(),
) -> Path:
    """``out/`` loads with ``AutoModelForCausalLM.from_pretrained``; ``out/peft/`` is the
    adapter (its module names count blocks by position in this model, see ``note``);
    ``with_base`` also saves the model under the LoRA as ``out/base/``, the adapter's base.
    ``files`` says where the adapter goes, which base it names and its model card.
    ``out/`` appears only complete (written elsewhere, then renamed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}-partial-*"):  # a crashed export's leftovers
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-partial-"))
    try:
        _write_lora_model(lora, tokenizer, tmp, out, note, merged, with_base, files)
        if out.exists():
            old = tmp.with_name(tmp.name + "-old")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_lora_model(
    lora: LoraModel,
    tokenizer: PreTrainedTokenizerBase,
    tmp: Path,
    out: Path,
    note: dict,
    merged: bool,
    with_base: bool,
    files: AdapterFiles,
) -> None:
    """The files of ``export_lora_model`` in ``tmp``; paths written into them name ``out``."""
    adapter = tmp / files.adapter_dir
    lora.peft.save_pretrained(adapter)
    (adapter / "fedbiot_layout.json").write_text(json.dumps(note, indent=2))
    base_model = files.base_model
    if with_base:
        base = copy.deepcopy(lora.peft).unload()
        base.save_pretrained(tmp / "base")
        tokenizer.save_pretrained(tmp / "base")
        base_model = str((out / "base").resolve())
    if base_model:
        adapter_config = adapter / "adapter_config.json"
        config = json.loads(adapter_config.read_text())
        config["base_model_name_or_path"] = base_model
        adapter_config.write_text(json.dumps(config, indent=2, sort_keys=True))
    if merged:
        merged_model = copy.deepcopy(lora.peft).merge_and_unload()
        merged_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    if files.cards.get(note["variant"]):  # replaces PEFT's empty template card
        for folder in {tmp, adapter}:
            (folder / "README.md").write_text(files.cards[note["variant"]])


def exports_complete(run_dir: Path, has_emulator: bool) -> bool:
    """Whether ``export_outputs`` finished for this run folder (each folder is renamed into
    place only once written)."""
    names = ("adapemu", "adapfu") if has_emulator else ("adapfu",)
    return all((run_dir / name).is_dir() for name in names)


def export_outputs(
    models: FedBiOTModels, run_dir: Path, files: AdapterFiles = AdapterFiles()
) -> dict[str, Path]:
    """Write ``adapemu/`` (E∘A) and ``adapfu/`` (E*∘A with the trained adapter)."""
    layout = models.layout.to_dict()
    outputs = {}
    if models.has_emulator:
        outputs["adapemu"] = export_lora_model(
            models.compressed,
            models.tokenizer,
            run_dir / "adapemu",
            {"variant": "adapemu", "positions_are_blocks": models.layout.kept_blocks, **layout},
            with_base=True,
            files=files,
        )
    outputs["adapfu"] = export_lora_model(
        models.full, models.tokenizer, run_dir / "adapfu", _adapfu_note(models), files=files
    )
    return outputs


def _adapfu_note(models: FedBiOTModels) -> dict:
    layout = models.layout.to_dict()
    return {
        "variant": "adapfu",
        "positions_are_blocks": list(range(layout["num_blocks"])),
        **layout,
    }


def export_round_adapter(
    models: FedBiOTModels, run_dir: Path, server_round: int, files: AdapterFiles = AdapterFiles()
) -> Path:
    """AdapFu's adapter after ``server_round`` as ``peft_<round>/`` (FlowerTune's layout:
    ``PeftModel.from_pretrained(full_base, "peft_<round>")``), written then renamed."""
    return export_lora_model(
        models.full,
        models.tokenizer,
        run_dir / f"peft_{server_round}",
        {**_adapfu_note(models), "round": server_round},
        merged=False,
        files=replace(files, adapter_dir=""),
    )


def export_client_models(
    models: FedBiOTModels,
    client_arrays: dict[int, ArrayRecord],
    run_dir: Path,
    client_partitions: dict[int, int],
    files: AdapterFiles = AdapterFiles(),
) -> dict[str, Path]:
    """The local-only baseline: ``clients/<partition-id>/peft/``, one adapter per client;
    its ``fedbiot_layout.json`` names the partition and the number of partitions."""
    outputs = {}
    note = {"positions_are_blocks": list(range(models.layout.num_blocks))}
    for partition, arrays in sorted(client_arrays.items()):
        models.set_adapter(from_record(arrays))
        outputs[f"client {partition}"] = export_lora_model(
            models.full,
            models.tokenizer,
            run_dir / "clients" / str(partition),
            {
                "variant": "local",
                "partition_id": partition,
                "num_partitions": client_partitions[partition],
                **note,
            },
            merged=False,
            files=files,
        )
    return outputs
