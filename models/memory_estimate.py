"""Estimated training memory of a client (and the FedBiOT server), before any weights load.

Used by ``bench/memory_plan.py`` (what a GPU must hold, checked against measured peaks) and by
the FedBiAlign server's depth table (``server_app/app.py``), so both use one estimator.

Method, per component:

- frozen weights: parameter counts of the client's model (compressed for FedBiOT and FedOT,
  full for FedIT) from the model built on the ``meta`` device (no weights), times the
  dtype's bytes. Quantized clients (bitsandbytes, as ``models/quantization.py`` loads them)
  store the blocks' linear weights in ``bits/8`` bytes plus quantization constants: NF4 uses
  blocks of 64 with one fp32 absmax each, double quantization stores those as 8-bit with one
  fp32 constant per 256 of them (Dettmers et al., QLoRA, 2023, section 3), so
  ``1/64 + 4/(64*256)`` bytes per weight; LLM.int8 keeps one fp32 scale per output row.
  Embeddings, norms and the LM head stay in the compute dtype (bfloat16 unless float16).
- LoRA: ``r * (in + out)`` parameters on every linear of the client's blocks
  (``models/lora.py``), float32; the trained blocks' also hold a gradient 4 and AdamW's two
  moments 8 bytes.
- activations: measured, not modelled. On a tiny model of the same architecture (same
  class, head size 16, three hidden/intermediate/vocab sizes) one forward of the client's
  loss runs under ``torch.autograd.graph.saved_tensors_hooks``, which sees every tensor
  autograd keeps for backward; their storages (not parameters, each storage once) are summed.
  Three runs per size separate the parts: one LoRA block trained, two LoRA blocks (the
  difference is one LoRA block), and LoRA on the lower block only (the upper block is then
  a frozen block inside the backward region). Per token, each part is fitted linearly in
  (1, hidden, intermediate) for blocks and (1, hidden, vocab) for the head (the float32
  logits and log-softmax), then scaled to the real shape, batch and sequence (SDPA
  attention saves O(tokens), not O(tokens^2)). With gradient checkpointing a trained block
  keeps only its input, plus one block's activations while it is recomputed. The backward
  region starts at the lowest trained block.
- the step's peak extra memory = activations + LoRA gradients and AdamW moments + the
  head's backward transient: at the start of backward, while the saved log-softmax is still
  alive, the loss's gradient holds two float32 tokens x vocab tensors (the gradients of the
  log-softmax's output and input) and one in the logits' dtype, ``tokens * vocab * (8 +
  dtype bytes)``; this term was read off the measured peaks on the CPU
  (``python -m bench.memory_plan --check``).

The server (FedBiOT) holds the full model once (the compressed model shares its tensors,
``models/blocks.extract_blocks``), LoRA on adapter and emulator, and the distillation step
(``models/distillation.py``) at the same batch and sequence: its KL on the logits
backpropagates through the adapter (frozen there) into the emulator's LoRA, and it also
keeps the teacher's float32 log-softmax.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from models.blocks import get_blocks
from models.layout import Layout, fedbiot_layout, fedot_layout, full_layout
from models.lora import LoraModel, LoraSpec
from models.response_logits import response_logits

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Tiny shapes the activation coefficients are fitted on: (hidden, intermediate, vocab).
FIT_SHAPES = ((64, 128, 512), (64, 256, 1024), (128, 256, 512))
FIT_BATCH, FIT_SEQ = 2, 32


@dataclass(frozen=True)
class Setup:
    """One client setting to estimate: the model, its layout and how it trains."""

    model: str
    method: str = "fedbiot"
    drop_rate: float = 0.2
    adapter_layers: int = 2
    dtype: str = "float32"
    bits: int = 32  # the client's frozen weights: 32/16 = unquantized dtype, 8 or 4
    batch: int = 4
    seq: int = 128
    checkpointing: bool = False
    lora_r: int = 8


def layout_of(method: str, num_blocks: int, setup: Setup) -> Layout:
    if method == "fedbiot":
        return fedbiot_layout(num_blocks, setup.adapter_layers, setup.drop_rate)
    if method in ("fedot", "offsite"):
        return fedot_layout(num_blocks, setup.drop_rate)
    if method == "fedit":
        return full_layout(num_blocks)
    raise ValueError(f"method={method!r}: expected fedbiot, fedot, offsite or fedit")


def meta_model(config: PretrainedConfig) -> nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _numel(params: Iterable[nn.Parameter]) -> int:
    return sum(p.numel() for p in {id(p): p for p in params}.values())


def lora_params(block: nn.Module, r: int) -> int:
    """LoRA parameters on every linear of ``block``: ``r * (in + out)`` each."""
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    return sum(r * (m.in_features + m.out_features) for m in linears)


def weight_bytes(model: nn.Module, kept: tuple[int, ...], dtype: str, bits: int) -> float:
    """Bytes of the frozen weights of ``model`` restricted to blocks ``kept``."""
    blocks = get_blocks(model)
    block_ids = {id(p) for b in blocks for p in b.parameters()}
    rest = _numel(p for p in model.parameters() if id(p) not in block_ids)
    linear = _numel(m.weight for i in kept for m in blocks[i].modules() if isinstance(m, nn.Linear))
    other = _numel(p for i in kept for p in blocks[i].parameters()) - linear
    if bits >= 16:
        return (rest + linear + other) * DTYPE_BYTES[dtype]
    compute = 2  # bitsandbytes computes in bfloat16 (or float16)
    rows = sum(
        m.out_features for i in kept for m in blocks[i].modules() if isinstance(m, nn.Linear)
    )
    quant = linear * (0.5 + 1 / 64 + 4 / (64 * 256)) if bits == 4 else linear + 4 * rows
    return (rest + other) * compute + quant


def _tiny_config(config: PretrainedConfig, hidden: int, inter: int, vocab: int) -> PretrainedConfig:
    heads = hidden // 16
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    ratio = max(config.num_attention_heads // kv, 1)
    values = config.to_dict() | {
        "hidden_size": hidden,
        "intermediate_size": inter,
        "vocab_size": vocab,
        "num_hidden_layers": 2,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // ratio),
        "head_dim": 16,
    }
    values.pop("layer_types", None)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        values[key] = 0
    return AutoConfig.for_model(**values)


def saved_bytes(lora: LoraModel, blocks: tuple[int, ...], batch: int, seq: int) -> int:
    """Bytes autograd saves for backward in one forward of the client's loss, training the
    LoRA of ``blocks`` (parameters excluded, each storage counted once)."""
    lora.train_only(blocks)
    params = {p.untyped_storage().data_ptr() for p in lora.peft.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    vocab = lora.peft.get_base_model().config.vocab_size
    ids = torch.randint(vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    lora.peft.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, targets = response_logits(lora.peft, data)
        loss = F.cross_entropy(logits.float(), targets)
    del loss, logits
    return sum(storages.values())


def fit_activations(config: PretrainedConfig, dtype: str, r: int) -> dict[str, list[float]]:
    """Per-token bytes of a LoRA block, a frozen block inside the backward region and the
    head, as linear coefficients over (1, hidden, intermediate) resp. (1, hidden, vocab).
    The caller's random state is restored (the server estimates mid-run)."""
    rows = []
    with torch.random.fork_rng(devices=[]):
        for hidden, inter, vocab in FIT_SHAPES:
            torch.manual_seed(0)
            tiny = AutoModelForCausalLM.from_config(_tiny_config(config, hidden, inter, vocab))
            tiny.to(getattr(torch, dtype))
            lora = LoraModel(tiny, (0, 1), (0, 1), LoraSpec(r=r, alpha=2 * r, dropout=0.05))
            tokens = FIT_BATCH * FIT_SEQ
            top = saved_bytes(lora, (1,), FIT_BATCH, FIT_SEQ) / tokens
            both = saved_bytes(lora, (0, 1), FIT_BATCH, FIT_SEQ) / tokens
            bottom = saved_bytes(lora, (0,), FIT_BATCH, FIT_SEQ) / tokens
            lora_block = both - top
            rows.append((hidden, inter, vocab, lora_block, bottom - top, top - lora_block))
    a = np.array(rows)
    ones = np.ones(len(rows))
    block_x = np.stack([ones, a[:, 0], a[:, 1]], 1)
    head_x = np.stack([ones, a[:, 0], a[:, 2]], 1)
    solve = np.linalg.lstsq
    return {
        "lora_block": solve(block_x, a[:, 3], rcond=None)[0].tolist(),
        "frozen_block": solve(block_x, a[:, 4], rcond=None)[0].tolist(),
        "head": solve(head_x, a[:, 5], rcond=None)[0].tolist(),
    }


def _apply(coef: list[float], x1: float, x2: float) -> float:
    return max(coef[0] + coef[1] * x1 + coef[2] * x2, 0.0)


def region_activations(
    fit: dict, config: PretrainedConfig, lora_n: int, frozen_n: int, tokens: int, setup: Setup
) -> float:
    """Saved bytes of a backward region with ``lora_n`` LoRA and ``frozen_n`` frozen blocks."""
    h, i = config.hidden_size, config.intermediate_size
    lora_block = _apply(fit["lora_block"], h, i) * tokens
    frozen_block = _apply(fit["frozen_block"], h, i) * tokens
    if setup.checkpointing:
        inputs = (lora_n + frozen_n) * tokens * h * DTYPE_BYTES[setup.dtype]
        return inputs + max(lora_block if lora_n else 0.0, frozen_block)
    return lora_n * lora_block + frozen_n * frozen_block


def head_activations(fit: dict, config: PretrainedConfig, tokens: int) -> float:
    """Saved bytes of the head (final norm, logits and the loss's float32 log-softmax)."""
    return _apply(fit["head"], config.hidden_size, config.vocab_size) * tokens


def client_memory(
    setup: Setup,
    config: PretrainedConfig,
    fit: dict,
    layout: Layout,
    trained: tuple[int, ...],
    model: nn.Module | None = None,
) -> dict[str, float]:
    """Bytes of one client of ``layout`` that holds LoRA on all its blocks and trains the
    LoRA of ``trained`` (original block indices): its backward region runs from the lowest
    trained block to the top. ``model``: the meta model of ``config``, if built already."""
    model = model or meta_model(config)
    blocks = get_blocks(model)
    n = len(blocks)
    kept = layout.kept_blocks if setup.method != "fedit" else tuple(range(n))
    tokens = setup.batch * setup.seq
    region = kept[kept.index(min(trained)) :]
    lora_n = sum(b in trained for b in region)
    trained_n = sum(lora_params(blocks[b], setup.lora_r) for b in trained)
    held = (*layout.adapter_blocks, *layout.emulator_blocks)
    held_n = sum(lora_params(blocks[b], setup.lora_r) for b in held)
    acts = region_activations(fit, config, lora_n, len(region) - lora_n, tokens, setup)
    client = {
        "frozen_weights": weight_bytes(model, kept, setup.dtype, setup.bits),
        "lora_params": held_n * 4.0,
        "lora_grads_adam": trained_n * 12.0,
        "activations": acts + head_activations(fit, config, tokens),
        "head_backward": tokens * config.vocab_size * (8.0 + DTYPE_BYTES[setup.dtype]),
    }
    client["step_extra"] = (
        client["lora_grads_adam"] + client["activations"] + client["head_backward"]
    )
    client["total"] = client["frozen_weights"] + client["lora_params"] + client["step_extra"]
    return client


def depth_memory(
    setup: Setup,
    config: PretrainedConfig,
    layout: Layout,
    depths: Sequence[int],
    prox: bool = False,
    fit: dict | None = None,
) -> dict[int, dict[str, float]]:
    """Bytes of a FedBiAlign client of each depth ``d``: LoRA on all its blocks, the LoRA of
    the last ``d`` adapter blocks trained. ``prox``: FedBiOT's proximal term keeps a copy
    of the trained LoRA for the step (``federation/proximal.py``)."""
    region = layout.adapter_blocks
    model = meta_model(config)
    fit = fit or fit_activations(config, setup.dtype, setup.lora_r)
    rows = {}
    for depth in depths:
        if not 1 <= depth <= len(region):
            raise ValueError(f"depth {depth} is outside 1..{len(region)}")
        row = client_memory(setup, config, fit, layout, region[-depth:], model)
        anchor = row["lora_grads_adam"] / 3 if prox else 0.0  # float32, like the gradient
        row["step_extra"] += anchor
        row["total"] += anchor
        rows[depth] = row
    return rows


def plan(setup: Setup, config: PretrainedConfig, fit: dict | None = None) -> dict:
    """Bytes of every component for the server and one client of ``setup``."""
    model = meta_model(config)
    blocks = get_blocks(model)
    n = len(blocks)
    layout = layout_of(setup.method, n, setup)
    fit = fit or fit_activations(config, setup.dtype, setup.lora_r)
    tokens = setup.batch * setup.seq
    client = client_memory(setup, config, fit, layout, layout.adapter_blocks, model)
    trained = sum(lora_params(blocks[b], setup.lora_r) for b in layout.adapter_blocks)
    emulator = layout.emulator_blocks
    emu_lora = sum(lora_params(blocks[b], setup.lora_r) for b in emulator)
    distill = 0.0
    if emulator:  # backward from the KL on the logits through the adapter to the emulator
        distill = region_activations(
            fit, config, len(emulator), len(layout.adapter_blocks), tokens, setup
        )
        head = head_activations(fit, config, tokens)
        distill += head + tokens * config.vocab_size * 4 + client["head_backward"]
    server = {
        "frozen_weights": weight_bytes(model, tuple(range(n)), setup.dtype, 32),
        "lora_params": (trained + emu_lora) * 4.0,
        "lora_grads_adam": emu_lora * 12.0,
        "activations": float(distill),
    }
    server["total"] = sum(server.values())
    return {"setup": asdict(setup), "layout": layout.to_dict(), "client": client, "server": server}
