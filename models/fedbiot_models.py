"""The server's pair of FedBiOT models and the package a client needs to rebuild its own.

The server holds the full model E*∘A and the compressed model E∘A, both with LoRA: the
compressed one on every kept block (emulator LoRA is distilled, adapter LoRA is trained by
clients), the full one on the adapter blocks only (E* stays exact). Adapter LoRA is kept
identical in both. Clients receive the compressed frozen weights once, as a model package,
and afterwards only LoRA.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from flwr.app import ConfigRecord
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from models.blocks import extract_blocks
from models.layout import Layout
from models.lora import LoraModel, LoraSpec
from models.wire import from_record, state_digest, to_record


def untied_state(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The state dict without second names for shared tensors (tied embeddings).

    ``from_pretrained`` re-ties them on the client, so they need not travel twice.
    """
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return out


class FedBiOTModels:
    """Compressed and full models with shared adapter LoRA, kept on the server."""

    def __init__(
        self,
        base: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        layout: Layout,
        spec: LoraSpec,
    ) -> None:
        self.layout = layout
        self.tokenizer = tokenizer
        uncompressed = not layout.dropped_blocks and not layout.emulator_blocks
        # With nothing dropped (LoRA on the whole model) one model serves as both.
        compressed = base if uncompressed else extract_blocks(base, layout.kept_blocks)
        self.frozen = to_record(untied_state(compressed))
        # Full SHA-256 of the tensors: the node's cache key, checked against its stored copy.
        self.frozen_digest = state_digest(from_record(self.frozen))
        self.compressed_config = compressed.config.to_json_string()
        self.compressed = LoraModel(compressed, layout.kept_blocks, layout.kept_blocks, spec)
        if uncompressed:
            self.full = self.compressed
        else:
            all_blocks = tuple(range(layout.num_blocks))
            self.full = LoraModel(base, all_blocks, layout.adapter_blocks, spec)
            self.full.load_state(self.adapter_state())

    @property
    def has_emulator(self) -> bool:
        """False for methods that put LoRA on the whole model (nothing to distil)."""
        return bool(self.layout.emulator_blocks)

    def to(self, device: torch.device) -> None:
        """Move both models (the frozen package for clients stays on the CPU)."""
        self.compressed.peft.to(device)
        if self.full is not self.compressed:
            self.full.peft.to(device)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Adapter LoRA (what clients train and return)."""
        return self.compressed.state(self.layout.adapter_blocks)

    def emulator_state(self) -> dict[str, torch.Tensor]:
        """Emulator LoRA (what distillation trains)."""
        return self.compressed.state(self.layout.emulator_blocks)

    def set_adapter(self, state: dict[str, torch.Tensor]) -> None:
        """Install adapter LoRA in both models, so AdapEmu and AdapFu stay in step."""
        self.compressed.load_state(state)
        if self.full is not self.compressed:
            self.full.load_state(state)

    def set_emulator(self, state: dict[str, torch.Tensor]) -> None:
        self.compressed.load_state(state)

    def model_package(self) -> ConfigRecord:
        """What a client needs besides the frozen arrays: config, layout and tokenizer."""
        with tempfile.TemporaryDirectory() as tmp:
            self.tokenizer.save_pretrained(tmp)
            files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
        return ConfigRecord(
            {
                "digest": self.frozen_digest,
                "config-json": self.compressed_config,
                "layout-json": json.dumps(self.layout.to_dict()),
                "tokenizer-files": json.dumps(sorted(files)),
                **{f"tokenizer:{name}": data for name, data in files.items()},
            }
        )
