"""GPU check: SmolLM2-135M client tokens/s and peak CUDA memory per precision, the bf16
FedBiOT step's model FLOPs utilisation, and a 2-round FedBiOT ``flwr run`` on the GPU.

    python -m bench.gpu_check --json gpu_check.json     # or bench/gpu_check.sh

Clients are loaded the way a node loads them (the server's model package, stored and read
back by ``client_app.model_cache.load_client_model`` with the run's ``dtype`` and
``quantization``), and train with the client's own step (``train_lora``) on random tokens:
one warm-up step, then ``--steps`` timed ones. Peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps (weights included). MFU is the
step's FLOPs (``models/flops.py``, counted by PyTorch) x tokens/s / 989 TFLOP/s, the H100 /
H200 SXM's dense bfloat16 peak from NVIDIA's H100 and H200 data sheets (1979 TFLOP/s is
with 2:4 sparsity).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

PEAK_BF16_FLOPS = 989e12  # H100/H200 SXM dense bfloat16, NVIDIA data sheets
# (row name, dtype, gradient checkpointing, quantization run-config value)
PRECISIONS = (
    ("fp32", "float32", False, "none"),
    ("bf16", "bfloat16", False, "none"),
    ("bf16+ckpt", "bfloat16", True, "none"),
    ("4-bit", "bfloat16", False, "4bit"),
)
METHODS = {"fedbiot": "fedbiot", "fedit": "full"}  # method -> client layout


def client_row(root: Path, layout: str, dtype: str, ckpt: bool, quant: str, args) -> dict:
    """Tokens/s, peak CUDA memory and FLOPs/token of one client configuration."""
    from client_app.model_cache import load_client_model
    from federation.local_training import train_lora
    from models.flops import training_flops_per_token
    from models.lora import LoraSpec
    from models.precision import set_gradient_checkpointing

    info = json.loads((root / layout / "info.json").read_text())
    spec = LoraSpec(r=8, alpha=16)
    client = load_client_model(root / layout, info["digest"], spec, quant, getattr(torch, dtype))
    if client.quantization == "none":
        client.lora.peft.to("cuda")
    set_gradient_checkpointing(client.lora.peft.get_base_model(), ckpt)
    blocks = client.layout.adapter_blocks
    vocab = client.lora.peft.get_base_model().config.vocab_size

    def batches():
        while True:
            ids = torch.randint(vocab, (args.batch_size, args.seq_length))
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}

    first = {k: v.cuda() for k, v in next(batches()).items()}
    flops = training_flops_per_token(client.lora, blocks, first, response_only=False)
    train_lora(client.lora, blocks, batches(), steps=1, learning_rate=1e-4)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    result = train_lora(client.lora, blocks, batches(), steps=args.steps, learning_rate=1e-4)
    torch.cuda.synchronize()
    tokens_per_s = result.tokens / result.seconds
    row = {
        "tokens_per_s": tokens_per_s,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "gflop_per_token": flops / 1e9,
        "quantization": client.quantization,
        "note": client.quantization_note,
    }
    del client
    torch.cuda.empty_cache()
    return row


def federation_check(out: Path, rounds: int) -> dict:
    """A FedBiOT ``flwr run`` of ``rounds`` rounds on 3 simulated nodes with device=cuda."""
    from tests.flower_runtime import REPO, local_federation

    config = {
        "model": "smollm2-135m",
        "method": "fedbiot",
        "device": "cuda",
        "num-server-rounds": rounds,
        "eval-examples": 100,
        "output-dir": str(out),
        "run-name": "gpu-check",
        "data-dir": str(REPO / "data"),
        "cache-dir": str(out / "node-cache"),
    }
    begin = time.perf_counter()
    with local_federation(out / "flwr-home") as federation:
        rows = federation.run_to_end(
            config, supernodes=3, timeout=240, federation_config="client-resources-num-gpus=0.3"
        )
    return {"rounds": len(rows), "seconds": time.perf_counter() - begin, "last": rows[-1]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="SmolLM2-135M FedBiOT/FedIT client tokens/s and peak CUDA memory per "
        "precision, the bf16 FedBiOT step's MFU on an H200, and a 2-round FedBiOT flwr run."
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-federation", action="store_true")
    parser.add_argument("--json", default="", help="write the results here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench.gpu_check needs a CUDA device, and torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); run it on a GPU "
            "node with a CUDA build of torch (see bench/gpu_check.sh)",
            file=sys.stderr,
        )
        return 2
    from bench.client_cost import prepare_packages

    results: dict = {"device": torch.cuda.get_device_name(), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = argparse.Namespace(model="smollm2-135m", adapter_layers=2, drop_rate=0.2, lora_r=8)
        prepare_packages(model, root)
        print(f"{results['device']}, batch {args.batch_size} x seq {args.seq_length}\n")
        print("| method | precision | tokens/s | peak CUDA GiB | GFLOP/token | MFU |")
        print("| --- | --- | --- | --- | --- | --- |")
        for method, layout in METHODS.items():
            for name, dtype, ckpt, quant in PRECISIONS:
                try:
                    row = client_row(root, layout, dtype, ckpt, quant, args)
                except Exception as err:  # a row that cannot run is reported, not fatal
                    row = {"error": f"{type(err).__name__}: {err}"}
                    print(f"| {method} | {name} | failed: {row['error'][:200]} | | | |")
                    results["rows"].append({"method": method, "precision": name, **row})
                    continue
                mfu = ""
                if (method, name) == ("fedbiot", "bf16"):
                    row["mfu"] = row["gflop_per_token"] * 1e9 * row["tokens_per_s"]
                    row["mfu"] /= PEAK_BF16_FLOPS
                    mfu = f"{100 * row['mfu']:.2f} %"
                results["rows"].append({"method": method, "precision": name, **row})
                print(
                    f"| {method} | {name} | {row['tokens_per_s']:,.0f} | {row['peak_gib']:.2f} "
                    f"| {row['gflop_per_token']:.3f} | {mfu} |",
                    flush=True,
                )
        if not args.no_federation:
            fed = federation_check(root, args.rounds)
            results["federation"] = fed
            print(
                f"\nflwr run, FedBiOT, device=cuda: {fed['rounds']} rounds in "
                f"{fed['seconds']:.0f} s; last round: {fed['last']}"
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
