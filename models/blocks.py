"""Find a decoder's block list and cut a model down to a subset of its blocks.

Works for any decoder-only transformers model whose blocks are an ``nn.ModuleList`` at one of
the known paths. Per-block indices that the model keeps (the attention ``layer_idx`` used to
address the KV cache) are renumbered, and the config's layer count and per-layer lists are
cut to match, so the compressed model generates and saves like any other model.
"""

from __future__ import annotations

import copy

from torch import nn
from transformers import PreTrainedModel

# Llama/Mistral/Qwen2/Gemma, GPT-2, GPT-NeoX, OPT.
BLOCK_PATHS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")
# Config fields that hold one entry per block (e.g. Qwen2/Gemma sliding/full attention).
_PER_LAYER_CONFIG_FIELDS = ("layer_types",)


def _get_path(root: nn.Module, path: str) -> nn.Module | None:
    module: object = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module if isinstance(module, nn.Module) else None


def block_path(model: nn.Module) -> str:
    """Dotted path of the block ``ModuleList`` inside ``model`` (a bare HF model)."""
    for path in BLOCK_PATHS:
        if isinstance(_get_path(model, path), nn.ModuleList):
            return path
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    raise ValueError(
        f"unsupported model type {kind!r}: no block list at any of {', '.join(BLOCK_PATHS)}"
    )


def get_blocks(model: nn.Module) -> nn.ModuleList:
    """The block ``ModuleList`` of a bare HF model."""
    blocks = _get_path(model, block_path(model))
    assert isinstance(blocks, nn.ModuleList)
    return blocks


def _set_blocks(model: nn.Module, blocks: nn.ModuleList) -> None:
    parent_path, _, attr = block_path(model).rpartition(".")
    parent = _get_path(model, parent_path) if parent_path else model
    setattr(parent, attr, blocks)


def renumber_blocks(blocks: nn.ModuleList) -> None:
    """Set every ``layer_idx`` inside block ``i`` to ``i`` (KV-cache addressing)."""
    for position, block in enumerate(blocks):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = position


def extract_blocks(model: PreTrainedModel, keep: tuple[int, ...]) -> PreTrainedModel:
    """A model holding only the blocks ``keep`` (original indices, in order) of ``model``.

    Its modules are copies (so renumbering and LoRA wrapping leave ``model`` alone), but its
    parameters are ``model``'s own tensors: the server holds one copy of each frozen weight,
    not two. LoRA adds new parameters around them, so training the compressed model's LoRA
    leaves ``model`` unchanged; nothing may write the shared weights in place (exports merge
    LoRA into a deep copy). The original block list is swapped out during the copy, so the
    dropped blocks' modules are not copied either.
    """
    blocks = get_blocks(model)
    n = len(blocks)
    if not keep or any(not 0 <= i < n for i in keep) or list(keep) != sorted(set(keep)):
        raise ValueError(f"block indices {keep} must be distinct, sorted and in [0, {n})")
    subset = nn.ModuleList(blocks[i] for i in keep)
    _set_blocks(model, subset)
    try:
        shared = {id(p): p for p in model.parameters()}  # deepcopy's memo: not copied
        compressed = copy.deepcopy(model, shared)
    finally:
        _set_blocks(model, blocks)
    renumber_blocks(get_blocks(compressed))
    config = compressed.config
    config.num_hidden_layers = len(keep)
    for field in _PER_LAYER_CONFIG_FIELDS:
        values = getattr(config, field, None)
        if isinstance(values, list) and len(values) == n:
            setattr(config, field, [values[i] for i in keep])
    return compressed
