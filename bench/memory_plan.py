"""Memory plan: what the server and one client need, before renting a GPU.

    python -m bench.memory_plan                                   # the README's two setups
    python -m bench.memory_plan --json docs/bench/memory_plan.json
    python -m bench.memory_plan --model /models/Llama-2-7b-hf --dtype bfloat16 --batch 8 ...

Method, per component:

- frozen weights: parameter counts of the client's model (compressed for FedBiOT and FedOT,
  full for FedIT) from the model built on the ``meta`` device (no weights), times the
  dtype's bytes. Quantized clients (bitsandbytes, as ``models/quantization.py`` loads them)
  store the blocks' linear weights in ``bits/8`` bytes plus quantization constants: NF4 uses
  blocks of 64 with one fp32 absmax each, double quantization stores those as 8-bit with one
  fp32 constant per 256 of them (Dettmers et al., QLoRA, 2023, section 3), so
  ``1/64 + 4/(64*256)`` bytes per weight; LLM.int8 keeps one fp32 scale per output row.
  Embeddings, norms and the LM head stay in the compute dtype (bfloat16 unless float16).
- LoRA: ``r * (in + out)`` parameters on every linear of the trained blocks
  (``models/lora.py``), float32: value 4 + gradient 4 + AdamW's two moments 8 bytes.
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
  keeps only its input, plus one block's activations while it is recomputed.
- the step's peak extra memory = activations + LoRA gradients and AdamW moments + the
  head's backward transient: at the start of backward, while the saved log-softmax is still
  alive, the loss's gradient holds two float32 tokens x vocab tensors (the gradients of the
  log-softmax's output and input) and one in the logits' dtype, ``tokens * vocab * (8 +
  dtype bytes)``; this term was read off the measured peaks on the CPU (``--check``).

The server (FedBiOT) holds the full model once (the compressed model shares its tensors,
``models/blocks.extract_blocks``), LoRA on adapter and emulator, and the distillation step
(``models/distillation.py``) at the same batch and sequence: its KL on the logits
backpropagates through the adapter (frozen there) into the emulator's LoRA, and it also
keeps the teacher's float32 log-softmax.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from federation.step_memory import measure_training_memory, module_bytes
from models.blocks import extract_blocks, get_blocks
from models.depth_memory import GB as DECIMAL_GB
from models.layout import Layout, fedbiot_layout, fedot_layout, full_layout
from models.loading import load_model, resolve_model_dir
from models.lora import LoraModel, LoraSpec
from models.precision import set_gradient_checkpointing
from models.response_logits import response_logits

GB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Llama-2-7b-hf's config.json on the Hugging Face hub (meta-llama/Llama-2-7b-hf), for machines
# without the hub or the weights.
KNOWN_CONFIGS = {
    "meta-llama/Llama-2-7b-hf": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }
}
# Tiny shapes the activation coefficients are fitted on: (hidden, intermediate, vocab).
FIT_SHAPES = ((64, 128, 512), (64, 256, 1024), (128, 256, 512))
FIT_BATCH, FIT_SEQ = 2, 32


@dataclass(frozen=True)
class Setup:
    """One row of the plan."""

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


def load_config(model: str, config_json: str = "") -> PretrainedConfig:
    """The model's config: from ``config_json``, the known table, or a local dir / hub id."""
    if config_json:
        return AutoConfig.for_model(**json.loads(Path(config_json).read_text()))
    if model in KNOWN_CONFIGS:
        return AutoConfig.for_model(**KNOWN_CONFIGS[model])
    return AutoConfig.from_pretrained(resolve_model_dir(model))


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
    head, as linear coefficients over (1, hidden, intermediate) resp. (1, hidden, vocab)."""
    rows = []
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


def plan(setup: Setup, config: PretrainedConfig, fit: dict | None = None) -> dict:
    """Bytes of every component for the server and one client of ``setup``."""
    model = meta_model(config)
    blocks = get_blocks(model)
    n = len(blocks)
    layout = layout_of(setup.method, n, setup)
    kept = layout.kept_blocks if setup.method != "fedit" else tuple(range(n))
    fit = fit or fit_activations(config, setup.dtype, setup.lora_r)
    tokens = setup.batch * setup.seq
    lowest = kept.index(min(layout.adapter_blocks))
    region = kept[lowest:]
    lora_n = sum(b in layout.adapter_blocks for b in region)
    trained = sum(lora_params(blocks[b], setup.lora_r) for b in layout.adapter_blocks)
    head = _apply(fit["head"], config.hidden_size, config.vocab_size) * tokens
    acts = region_activations(fit, config, lora_n, len(region) - lora_n, tokens, setup)
    emulator = layout.emulator_blocks
    emu_lora = sum(lora_params(blocks[b], setup.lora_r) for b in emulator)
    client = {
        "frozen_weights": weight_bytes(model, kept, setup.dtype, setup.bits),
        "lora_params": (trained + emu_lora) * 4.0,
        "lora_grads_adam": trained * 12.0,
        "activations": acts + head,
        "head_backward": tokens * config.vocab_size * (8.0 + DTYPE_BYTES[setup.dtype]),
    }
    client["step_extra"] = (
        client["lora_grads_adam"] + client["activations"] + client["head_backward"]
    )
    client["total"] = client["frozen_weights"] + client["lora_params"] + client["step_extra"]
    distill = 0.0
    if emulator:  # backward from the KL on the logits through the adapter to the emulator
        distill = region_activations(
            fit, config, len(emulator), len(layout.adapter_blocks), tokens, setup
        )
        distill += head + tokens * config.vocab_size * 4 + client["head_backward"]
    server = {
        "frozen_weights": weight_bytes(model, tuple(range(n)), setup.dtype, 32),
        "lora_params": (trained + emu_lora) * 4.0,
        "lora_grads_adam": emu_lora * 12.0,
        "activations": float(distill),
    }
    server["total"] = sum(server.values())
    return {"setup": asdict(setup), "layout": layout.to_dict(), "client": client, "server": server}


def measure_client(setup: Setup) -> dict[str, float]:
    """A real client's frozen-weight bytes and measured peak extra bytes of one training step
    (``federation.step_memory.measure_training_memory``), for comparison with ``plan``."""
    model, _ = load_model(setup.model, getattr(torch, setup.dtype))
    layout = layout_of(setup.method, len(get_blocks(model)), setup)
    kept = layout.kept_blocks
    compressed = model if setup.method == "fedit" else extract_blocks(model, kept)
    frozen = sum(p.numel() * p.element_size() for p in compressed.parameters())
    lora = LoraModel(compressed, kept, kept, LoraSpec(r=setup.lora_r, alpha=2 * setup.lora_r))
    set_gradient_checkpointing(lora.peft.get_base_model(), setup.checkpointing)
    weights = module_bytes(lora.peft)
    region = layout.adapter_blocks
    total = measure_training_memory(lora, region, [len(region)], setup.batch, setup.seq)
    return {"frozen_weights": frozen, "step_extra": total[len(region)] * DECIMAL_GB - weights}


def check(setup: Setup, row: dict) -> dict[str, float]:
    """The plan's step memory next to a real client step's measured peak."""
    measured = measure_client(setup)["step_extra"]
    estimated = row["client"]["step_extra"]
    return {"estimated": estimated, "measured": measured, "ratio": estimated / measured}


def _gb(x: float) -> str:
    return f"{x / GB:.2f}"


def markdown(rows: list[dict]) -> str:
    head = (
        "| model | method | dtype | client bits | ckpt | b×s | client weights | LoRA+grads+Adam "
        "| activations | client total | server total |\n|" + " --- |" * 11
    )
    lines = [head]
    for row in rows:
        s, c, sv = row["setup"], row["client"], row["server"]
        lines.append(
            f"| {Path(s['model']).name} | {s['method']} | {s['dtype']} | {s['bits']} "
            f"| {'yes' if s['checkpointing'] else 'no'} | {s['batch']}×{s['seq']} "
            f"| {_gb(c['frozen_weights'])} | {_gb(c['lora_params'] + c['lora_grads_adam'])} "
            f"| {_gb(c['activations'] + c['head_backward'])} | {_gb(c['total'])} "
            f"| {_gb(sv['total'])} |"
        )
    return "\n".join(lines) + "\n\n(GiB; ckpt = gradient checkpointing)"


def readme_setups() -> list[Setup]:
    """Llama-2-7B at README's "A larger configuration for a GPU node" (s=2, beta=0.2, batch 8,
    seq 1024) and SmolLM2-135M at pyproject's default run (s=2, beta=0.2, batch 4, seq 128)."""
    llama = Setup("meta-llama/Llama-2-7b-hf", batch=8, seq=1024)
    return [
        llama,
        Setup(**asdict(llama) | {"dtype": "bfloat16", "bits": 16}),
        Setup(**asdict(llama) | {"dtype": "bfloat16", "bits": 16, "checkpointing": True}),
        Setup(**asdict(llama) | {"dtype": "bfloat16", "bits": 4}),
        Setup("smollm2-135m"),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="", help="local dir, known id or smollm2-135m")
    parser.add_argument("--config-json", default="", help="a config.json to plan for")
    parser.add_argument("--method", default="fedbiot")
    parser.add_argument("--drop-rate", type=float, default=0.2)
    parser.add_argument("--adapter-layers", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPE_BYTES))
    parser.add_argument("--bits", type=int, default=32, choices=(32, 16, 8, 4))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--json", default="", help="write the rows here")
    parser.add_argument(
        "--check", action="store_true", help="measure a real client step of the last row (CPU)"
    )
    args = parser.parse_args(argv)
    if args.model or args.config_json:
        fields = {k: v for k, v in vars(args).items() if k not in ("config_json", "json", "check")}
        setups = [Setup(**fields | {"model": args.model or args.config_json})]
    else:
        setups = readme_setups()
    rows = []
    for setup in setups:
        config = load_config(setup.model, args.config_json)
        rows.append(plan(setup, config))
    print(markdown(rows))
    out: dict = {"rows": rows}
    if args.check:
        out["check"] = check(setups[-1], rows[-1])
        c = out["check"]
        print(
            f"\n{setups[-1].model} {setups[-1].method} {setups[-1].dtype} client step, extra "
            f"memory: estimated {c['estimated'] / 2**20:.1f} MiB, measured "
            f"{c['measured'] / 2**20:.1f} MiB, ratio {c['ratio']:.3f}"
        )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
