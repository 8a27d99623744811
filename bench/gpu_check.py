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
with 2:4 sparsity). A failed row or flwr run makes the exit status 1; a failed run's
SuperLink/SuperNode logs go to ``<json stem>-logs/``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
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


def client_row(
    root: Path, layout: str, dtype: str, ckpt: bool, quant: str, args, flops: dict[str, float]
) -> dict:
    """Tokens/s, peak CUDA memory and FLOPs/token of one client configuration.

    FLOPs per token are the model's (no recomputation) and the same in every precision, so
    they are counted once per layout, in the first (fp32) row: PyTorch's FLOP counter
    rejects the grouped-query SDPA call that bf16 on CUDA takes."""
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
    if layout not in flops:
        flops[layout] = training_flops_per_token(client.lora, blocks, first, response_only=False)
    train_lora(client.lora, blocks, batches(), steps=1, learning_rate=1e-4)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    result = train_lora(client.lora, blocks, batches(), steps=args.steps, learning_rate=1e-4)
    torch.cuda.synchronize()
    tokens_per_s = result.tokens / result.seconds
    row = {
        "tokens_per_s": tokens_per_s,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "gflop_per_token": flops[layout] / 1e9,
        "quantization": client.quantization,
        "note": client.quantization_note,
    }
    del client
    torch.cuda.empty_cache()
    return row


def random_weights(model: str, out: Path) -> str:
    """``model``'s config and tokenizer with seeded random weights, saved in ``out``.

    For GPU nodes the weights cannot reach (one call carries at most 64 MiB; the embedded
    GGUF is 98 MB): throughput, memory and FLOPs depend on the shapes alone."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from models.loading import resolve_model_dir

    source = resolve_model_dir(model)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source)).save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    return str(out)


def federation_check(
    out: Path,
    rounds: int,
    model: str,
    device: str,
    timeout: float,
    overrides: dict[str, object] | None = None,
) -> dict:
    """A FedBiOT ``flwr run`` of ``rounds`` rounds on a real deployment: a SuperLink and 3
    SuperNode processes on loopback (``scripts/deploy_local.py``), each training on
    ``device``; ``overrides`` replace run-config defaults. The deployment runtime needs no
    Ray, whose wheel cannot travel to the GPU node with the rest."""
    from bench.run_files import metrics_rows
    from federation.run_config import run_config_arg
    from tests.flower_runtime import BIN, REPO, app_dir, flower_env

    config = {
        "model": model,
        "method": "fedbiot",
        "device": device,
        "num-server-rounds": rounds,
        "num-partitions": 3,
        "min-train-nodes": 3,
        "eval-examples": 100,
        "output-dir": str(out),
        "run-name": "gpu-check",
        "data-dir": str(REPO / "data"),
        **(overrides or {}),
    }
    deploy = [sys.executable, str(REPO / "scripts" / "deploy_local.py")]
    root = out / "deploy"
    subprocess.run([*deploy, "start", "--dir", str(root), "--nodes", "3", "--insecure"],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    env = flower_env(root / "flwr-home")
    run_config = run_config_arg(config)
    begin = time.perf_counter()
    try:
        done = subprocess.run(
            [str(BIN / "flwr"), "run", str(app_dir()), "local", "--stream",
             "--run-config", run_config],
            env=env, capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
    finally:
        subprocess.run([*deploy, "stop", "--dir", str(root)], check=True,
                       stdout=subprocess.DEVNULL)  # fmt: skip
    seconds = time.perf_counter() - begin
    rows = metrics_rows(out / "gpu-check", missing_ok=True)
    if done.returncode != 0 or not rows or rows[-1]["round"] != rounds:
        tail = (done.stdout + done.stderr)[-4000:]
        raise RuntimeError(f"the {rounds}-round flwr run did not finish:\n{tail}")
    return {"rounds": rounds, "seconds": seconds, "last": rows[-1]}


def keep_logs(root: Path, stem: Path) -> None:
    """Copy a failed check's SuperLink/SuperNode logs and metrics to ``<stem>-logs/``."""
    out = stem.parent / f"{stem.name}-logs"
    out.mkdir(parents=True, exist_ok=True)
    for log in [*(root / "deploy" / "logs").glob("*.log"), root / "gpu-check" / "metrics.jsonl"]:
        if log.is_file():
            shutil.copy2(log, out / log.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="SmolLM2-135M FedBiOT/FedIT client tokens/s and peak CUDA memory per "
        "precision, the bf16 FedBiOT step's MFU on an H200, and a 2-round FedBiOT flwr run."
    )
    parser.add_argument("--model", default="smollm2-135m", help="embedded name or directory")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="the model's config and tokenizer with seeded random weights (for GPU nodes the "
        "weights cannot reach; speed and memory depend on the shapes alone)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-federation", action="store_true")
    parser.add_argument(
        "--federation-timeout",
        type=float,
        default=600,
        help="seconds for the flwr run (250 s did not reach the end of round 1 on an H200)",
    )
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
        model_name = args.model
        if args.random_weights:
            model_name = random_weights(args.model, root / "model")
        results.update(model=args.model, random_weights=args.random_weights)
        model = argparse.Namespace(model=model_name, adapter_layers=2, drop_rate=0.2, lora_r=8)
        prepare_packages(model, root)
        weights = ", random weights" if args.random_weights else ""
        print(f"{results['device']}, {args.model}{weights}, batch {args.batch_size} x seq "
              f"{args.seq_length}\n")  # fmt: skip
        print("| method | precision | tokens/s | peak CUDA GiB | GFLOP/token | MFU |")
        print("| --- | --- | --- | --- | --- | --- |")
        flops: dict[str, float] = {}
        failed_rows = 0
        for method, layout in METHODS.items():
            for name, dtype, ckpt, quant in PRECISIONS:
                try:
                    row = client_row(root, layout, dtype, ckpt, quant, args, flops)
                except Exception as err:  # reported; the other rows still run
                    failed_rows += 1
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
        status = 1 if failed_rows else 0
        if not args.no_federation:
            try:
                fed = federation_check(
                    root, args.rounds, model_name, "cuda", args.federation_timeout
                )
            except Exception as err:  # the table above stays; the failure is the exit status
                fed = {"error": f"{type(err).__name__}: {err}"}
                print(f"\nflwr run, FedBiOT, device=cuda: failed: {fed['error']}")
                status = 1
                if args.json:  # the deployment's logs outlive the temporary folder
                    keep_logs(root, Path(args.json).with_suffix(""))
            else:
                timing = {k: v for k, v in fed["last"].items() if "seconds" in k or "loss" in k}
                print(
                    f"\nflwr run, FedBiOT, device=cuda, 3 SuperNodes: {fed['rounds']} rounds in "
                    f"{fed['seconds']:.0f} s; last round: {timing}"
                )
            results["federation"] = fed
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
