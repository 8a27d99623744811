"""LoRA (peft) on chosen blocks, with names that do not depend on a block's position.

A LoRA parameter is named by the *original* block index it belongs to, e.g.
``blocks.28.self_attn.q_proj.lora_A``. The compressed model (emulator + adapter) and the
full model (E* + adapter) hold the same adapter block at different positions; with original
indices, adapter LoRA moves between them, and between server and clients, by name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from models.blocks import block_path, get_blocks
from models.word_dropout import WordDropout

_ADAPTER = "default"


@dataclass(frozen=True)
class LoraSpec:
    """LoRA hyper-parameters shared by server and clients."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05


@dataclass
class LoraModule:
    """One LoRA-wrapped projection: its original block and its A, B and scaling."""

    block: int
    name: str
    layer: LoraLayer

    @property
    def lora_a(self) -> nn.Parameter:
        return self.layer.lora_A[_ADAPTER].weight

    @property
    def lora_b(self) -> nn.Parameter:
        return self.layer.lora_B[_ADAPTER].weight

    @property
    def scaling(self) -> float:
        return float(self.layer.scaling[_ADAPTER])


def _projection_names(model: PreTrainedModel, positions: Iterable[int]) -> list[str]:
    """Full module names of every linear projection inside the given block positions."""
    path = block_path(model)
    blocks = get_blocks(model)
    names = []
    for pos in positions:
        for sub, module in blocks[pos].named_modules():
            if isinstance(module, (nn.Linear, Conv1D)):
                names.append(f"{path}.{pos}.{sub}")
    return names


class LoraModel:
    """A peft model whose LoRA parameters are addressed by original block index."""

    def __init__(
        self,
        model: PreTrainedModel,
        block_ids: tuple[int, ...],
        lora_blocks: Iterable[int],
        spec: LoraSpec,
    ) -> None:
        """Wrap ``model`` (whose block at position ``p`` is original block ``block_ids[p]``).

        LoRA goes on every linear projection of the blocks in ``lora_blocks``.
        """
        if len(block_ids) != len(get_blocks(model)):
            raise ValueError(f"{len(block_ids)} block ids for {len(get_blocks(model))} blocks")
        wanted = set(lora_blocks)
        positions = [p for p, b in enumerate(block_ids) if b in wanted]
        targets = _projection_names(model, positions)
        conv1d = any(isinstance(model.get_submodule(t), Conv1D) for t in targets)
        config = LoraConfig(
            r=spec.r,
            lora_alpha=spec.alpha,
            lora_dropout=spec.dropout,
            target_modules=targets,
            fan_in_fan_out=conv1d,
            task_type="CAUSAL_LM",
        )
        self.spec = spec
        self.block_ids = block_ids
        self.peft: PeftModel = get_peft_model(model, config)
        for module in self.peft.modules():
            if isinstance(module, LoraLayer) and spec.dropout > 0:
                module.lora_dropout[_ADAPTER] = WordDropout(spec.dropout)
        prefix = f"base_model.model.{block_path(model)}."
        self.modules: dict[str, LoraModule] = {}
        for full_name, module in self.peft.named_modules():
            if isinstance(module, LoraLayer) and full_name.startswith(prefix):
                pos, _, sub = full_name[len(prefix) :].partition(".")
                block = block_ids[int(pos)]
                name = f"blocks.{block}.{sub}"
                self.modules[name] = LoraModule(block=block, name=name, layer=module)

    @property
    def device(self) -> torch.device:
        """Where the model's weights live (batches are moved there)."""
        return next(self.peft.parameters()).device

    def params(self, blocks: Iterable[int] | None = None) -> dict[str, nn.Parameter]:
        """LoRA parameters by canonical name, optionally only those of ``blocks``."""
        chosen = None if blocks is None else set(blocks)
        out: dict[str, nn.Parameter] = {}
        for name, module in self.modules.items():
            if chosen is None or module.block in chosen:
                out[f"{name}.lora_A"] = module.lora_a
                out[f"{name}.lora_B"] = module.lora_b
        return out

    def state(self, blocks: Iterable[int] | None = None) -> dict[str, torch.Tensor]:
        """Detached CPU copies of the LoRA parameters (what travels)."""
        return {k: p.detach().cpu().clone() for k, p in self.params(blocks).items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy tensors into the LoRA parameters of the same names; names must exist."""
        params = self.params()
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise KeyError(f"unknown LoRA parameters: {unknown[:5]}")
        with torch.no_grad():
            for name, value in state.items():
                target = params[name]
                if target.shape != value.shape:
                    raise ValueError(f"{name}: shape {tuple(value.shape)} != {tuple(target.shape)}")
                target.copy_(value.to(dtype=target.dtype, device=target.device))

    def train_only(self, blocks: Iterable[int]) -> list[nn.Parameter]:
        """Freeze everything but the LoRA of ``blocks``; return those parameters."""
        for p in self.peft.parameters():
            p.requires_grad_(False)
        trainable = list(self.params(blocks).values())
        for p in trainable:
            p.requires_grad_(True)
        return trainable

    def modules_of(self, blocks: Iterable[int]) -> list[LoraModule]:
        """LoRA modules of the given original blocks."""
        chosen = set(blocks)
        return [m for m in self.modules.values() if m.block in chosen]
