"""Memory plan: what the server and one client need, before renting a GPU.

    python -m bench.memory_plan                                   # the README's two setups
    python -m bench.memory_plan --json docs/bench/memory_plan.json
    python -m bench.memory_plan --model /models/Llama-2-7b-hf --dtype bfloat16 --batch 8 ...

The estimator (frozen weights, LoRA, fitted activations, the head's backward transient; the
server's distillation step) is ``models/memory_estimate.py``, shared with the FedBiAlign
server's depth table. ``--check`` measures a real client step
(``federation/step_memory.py``) next to it.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig

from federation.step_memory import measure_training_memory, module_bytes
from models.blocks import extract_blocks, get_blocks
from models.depth_memory import GB as DECIMAL_GB
from models.loading import load_model, resolve_model_dir
from models.lora import LoraModel, LoraSpec
from models.memory_estimate import DTYPE_BYTES, Setup, layout_of, plan
from models.precision import set_gradient_checkpointing

GB = 1024**3
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


def load_config(model: str, config_json: str = "") -> PretrainedConfig:
    """The model's config: from ``config_json``, the known table, or a local dir / hub id."""
    if config_json:
        return AutoConfig.for_model(**json.loads(Path(config_json).read_text()))
    if model in KNOWN_CONFIGS:
        return AutoConfig.for_model(**KNOWN_CONFIGS[model])
    return AutoConfig.from_pretrained(resolve_model_dir(model))


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
