"""The compressed model on a client: stored once per node, rebuilt from disk afterwards.

The server sends the compressed frozen weights (``base`` ArrayRecord) and a model package
(config, layout, tokenizer) the first time it samples a node. The node writes them as an
ordinary Hugging Face model directory under its cache, keyed by the weights' digest; every
later round sends only LoRA and names the digest. A process-level memo keeps the last model
in memory, so simulated clients sharing a worker do not reload it every round.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from models.layout import Layout
from models.loading import quiet_progress_off_terminal
from models.lora import LoraModel, LoraSpec
from models.quantization import load_plan
from models.wire import from_record


class MissingBaseError(RuntimeError):
    """The node has no cached copy of the compressed weights it was asked to use."""


@dataclass
class ClientModel:
    """A client's compressed model with LoRA on every block, and its tokenizer."""

    lora: LoraModel
    tokenizer: PreTrainedTokenizerBase
    layout: Layout
    quantization: str = "none"
    quantization_note: str = ""


_MEMO: dict[tuple[str, LoraSpec, str], ClientModel] = {}


def node_cache_dir(root: str, node_id: int) -> Path:
    """Per-node cache folder (a SuperNode may set its own with node config ``cache-dir``)."""
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "fedbiot"
    return base / "nodes" / str(node_id)


def store_package(cache: Path, base: ArrayRecord, package: ConfigRecord) -> Path:
    """Write the received weights and package as a model directory; return its path."""
    digest = str(package["digest"])
    target = cache / digest
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{digest}-"))
    try:
        tensors = {k: v.contiguous() for k, v in from_record(base).items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(str(package["config-json"]))
        (tmp / "fedbiot_layout.json").write_text(str(package["layout-json"]))
        for name in json.loads(str(package["tokenizer-files"])):
            (tmp / name).write_bytes(bytes(package[f"tokenizer:{name}"]))
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_client_model(
    cache: Path, digest: str, spec: LoraSpec, quantization: str = "none"
) -> ClientModel:
    """The compressed model of ``digest`` with LoRA on all its blocks; its frozen weights
    in 4 or 8 bits where ``quantization`` asks and the node can (see models/quantization)."""
    key = (digest, spec, quantization)
    if key in _MEMO:
        return _MEMO[key]
    directory = cache / digest
    if not directory.exists():
        raise MissingBaseError(f"no cached compressed model {digest} in {cache}")
    raw = json.loads((directory / "fedbiot_layout.json").read_text())
    layout = Layout(
        num_blocks=raw["num_blocks"],
        adapter_blocks=tuple(raw["adapter_blocks"]),
        emulator_blocks=tuple(raw["emulator_blocks"]),
    )
    quiet_progress_off_terminal()
    plan = load_plan(quantization)
    model = AutoModelForCausalLM.from_pretrained(directory, **plan.kwargs)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lora = LoraModel(model, layout.kept_blocks, layout.kept_blocks, spec)
    _MEMO.clear()
    _MEMO[key] = ClientModel(
        lora=lora,
        tokenizer=tokenizer,
        layout=layout,
        quantization=plan.mode,
        quantization_note=plan.note,
    )
    return _MEMO[key]
