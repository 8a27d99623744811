"""Client cost of FedBiOT against LoRA on the full model, on the embedded model.

For each layout, a fresh worker process trains LoRA for a few steps on the same GSM8K
batches and reports tokens per second (after one warm-up step) and its peak resident
memory; the bytes a client receives and sends per round are the sizes of the actual
ArrayRecords. Prints a table and writes JSON.

    python bench/client_cost.py                      # SmolLM2-135M, s=2, beta=0.5
    python bench/client_cost.py --model tiny-llama --steps 3 --json /tmp/cost.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from client_app.local_training import train_lora
from client_app.model_cache import load_client_model, store_package
from models.blocks import get_blocks
from models.fedbiot_models import FedBiOTModels
from models.layout import fedbiot_layout
from models.loading import load_model
from models.lora import LoraModel, LoraSpec
from models.wire import record_bytes, to_record
from task_data import batch_iterator, load_records, tokenize_records

VARIANTS = ("fedbiot", "full-lora")


def _batches(tokenizer, args: argparse.Namespace):
    records = load_records("gsm8k", "train")[: args.batch_size * (args.steps + 1)]
    examples = tokenize_records(tokenizer, records, args.seq_length)
    return batch_iterator(examples, args.batch_size, 0, tokenizer.pad_token_id)


def _measure(lora: LoraModel, blocks, tokenizer, args: argparse.Namespace) -> dict:
    batches = _batches(tokenizer, args)
    train_lora(lora, blocks, batches, steps=1, learning_rate=1e-4, prox_epsilon=0.01)
    if lora.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    result = train_lora(
        lora, blocks, batches, steps=args.steps, learning_rate=1e-4, prox_epsilon=0.01
    )
    if lora.device.type == "cuda":
        torch.cuda.synchronize()
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "tokens_per_s": result.tokens / result.seconds,
        "peak_mb": peak_mb,
        "trainable_params": sum(p.numel() for p in lora.params(blocks).values()),
    }


def worker(args: argparse.Namespace) -> dict:
    """One layout, measured in this (fresh) process."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    spec = LoraSpec(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.0)
    if args.worker == "fedbiot":
        info = json.loads(Path(args.package, "info.json").read_text())
        client = load_client_model(Path(args.package), info["digest"], spec)
        client.lora.peft.to(args.device)
        adapter = client.layout.adapter_blocks
        out = _measure(client.lora, adapter, client.tokenizer, args)
        up = record_bytes(to_record(client.lora.state(adapter)))
        down = up + record_bytes(to_record(client.lora.state(client.layout.emulator_blocks)))
        out.update(bytes_up=up, bytes_down=down, bytes_model_download=info["bytes"])
        return out
    model, tokenizer = load_model(args.model)
    n = len(get_blocks(model))
    lora = LoraModel(model, tuple(range(n)), range(n), spec)
    lora.peft.to(args.device)
    out = _measure(lora, range(n), tokenizer, args)
    lora_bytes = record_bytes(to_record(lora.state()))
    out.update(bytes_up=lora_bytes, bytes_down=lora_bytes, bytes_model_download=0)
    return out


def prepare_package(args: argparse.Namespace, cache: Path) -> None:
    """What a FedBiOT client stores after its first round: the compressed model only."""
    model, tokenizer = load_model(args.model)
    layout = fedbiot_layout(len(get_blocks(model)), args.adapter_layers, args.drop_rate)
    pair = FedBiOTModels(model, tokenizer, layout, LoraSpec(r=args.lora_r))
    store_package(cache, pair.frozen, pair.model_package())
    info = {"digest": pair.frozen_digest, "bytes": record_bytes(pair.frozen)}
    (cache / "info.json").write_text(json.dumps(info))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--adapter-layers", type=int, default=2)
    parser.add_argument("--drop-rate", type=float, default=0.5)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (peak memory: RSS or CUDA)")
    parser.add_argument("--json", default="bench/results/client_cost.json")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--package", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        prepare_package(args, Path(tmp))
        for variant in VARIANTS:
            command = [sys.executable, __file__, *sys.argv[1:], "--worker", variant]
            command += ["--package", tmp]
            start = time.perf_counter()
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            rows[variant] = json.loads(done.stdout.strip().splitlines()[-1])
            rows[variant]["wall_s"] = time.perf_counter() - start
    ours, full = rows["fedbiot"], rows["full-lora"]
    summary = {
        "throughput_ratio": ours["tokens_per_s"] / full["tokens_per_s"],
        "upload_fraction": ours["bytes_up"] / full["bytes_up"],
        "memory_ratio": ours["peak_mb"] / full["peak_mb"],
    }
    header = (
        f"{'layout':<10} {'tok/s':>8} {'peak MB':>8} {'trainable':>10} {'up B':>10} {'down B':>10}"
    )
    print(header)
    for name, row in rows.items():
        print(
            f"{name:<10} {row['tokens_per_s']:>8.1f} {row['peak_mb']:>8.0f} "
            f"{row['trainable_params']:>10,} {row['bytes_up']:>10,} {row['bytes_down']:>10,}"
        )
    print(
        f"FedBiOT / full: {summary['throughput_ratio']:.2f}x throughput (target >= 3x), "
        f"{100 * summary['upload_fraction']:.1f}% of upload bytes (target <= 8%), "
        f"one-time download {ours['bytes_model_download']:,} B"
    )
    document = {"args": vars(args), "rows": rows, "summary": summary}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(document, indent=2))
    print(json.dumps(document))


if __name__ == "__main__":
    main()
