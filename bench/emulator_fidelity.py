"""How close pre-alignment brings the emulator to the full model, step by step, per drop rate.

For each drop rate β, the server's pre-alignment (``EmulatorDistiller``, the run's own code)
runs on the public data, and every ``--every`` steps the bench measures E∘A against E*∘A:
KL(p_{E*∘A} || p_{E∘A}) per response token and top-1 agreement, each with a 95 % interval
that resamples texts, on held-out public texts (never distilled on) and on Banking77
validation texts (the part of the training split no client trains on). The adapter is the
untrained one here; FedBiOT's runs report the same measure on every due round
(``fidelity_*`` keys) with the trained adapter.

    python -m bench.emulator_fidelity --betas 0.2 0.5 --steps 100 --every 20
    python -m bench.emulator_fidelity --model tiny-llama --steps 2 --every 1 --texts 4   # smoke

Prints a table and writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("FEDBIOT_CACHE", str(REPO / ".cache" / "fedbiot"))

from federation.run_config import RunConfig  # noqa: E402
from models.blocks import get_blocks  # noqa: E402
from models.distillation import EmulatorDistiller  # noqa: E402
from models.fedbiot_models import FedBiOTModels  # noqa: E402
from models.fidelity import per_text_agreement  # noqa: E402
from models.layout import fedbiot_layout  # noqa: E402
from models.loading import load_model  # noqa: E402
from models.lora import LoraSpec  # noqa: E402
from server_app.evaluation.confidence import agreement_intervals, interval_cell  # noqa: E402
from server_app.run_setup import public_batches, public_heldout_records  # noqa: E402
from task_data import collate, load_records, tokenize_records  # noqa: E402
from task_data.validation import validation_split  # noqa: E402


def batches(tokenizer, records: list[dict], config: RunConfig) -> list[dict]:
    examples = tokenize_records(tokenizer, records, config.seq_length)
    size = config.batch_size
    return [collate(examples[i : i + size], tokenizer.pad_token_id)
            for i in range(0, len(examples), size)]  # fmt: skip


def curve(beta: float, args: argparse.Namespace) -> list[dict[str, float]]:
    """Fidelity at step 0 and every ``every`` steps of pre-alignment with drop rate ``beta``."""
    config = RunConfig.from_flower({
        "model": args.model, "task": "banking77", "drop-rate": beta, "seed": args.seed,
        "adapter-layers": args.adapter_layers, "batch-size": 4, "seq-length": 128,
        "eval-split": "validation", "eval-examples": 500, "data-dir": str(REPO / "data"),
    })  # fmt: skip
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model)
    layout = fedbiot_layout(len(get_blocks(model)), config.adapter_layers, beta)
    models = FedBiOTModels(
        model, tokenizer, layout, LoraSpec(r=config.lora_r, alpha=config.lora_alpha)
    )
    distiller = EmulatorDistiller(
        models, public_batches(config, tokenizer), config.distill_lr, config.kd_lambda
    )
    task = validation_split(load_records("banking77", "train"), 500)[1][: args.texts]
    held = {
        "task": batches(tokenizer, task, config),
        "public": batches(tokenizer, public_heldout_records(config, args.texts), config),
    }
    points, step, start = [], 0, time.perf_counter()
    while True:
        row: dict[str, float] = {"beta": beta, "step": step}
        for name, data in held.items():
            texts = per_text_agreement(models.full.peft, models.compressed.peft, data)
            for metric, interval in agreement_intervals(texts, args.seed).items():
                row |= interval.keys(f"{name}_{metric}")
        row["seconds"] = time.perf_counter() - start
        points.append(row)
        print(json.dumps(row), flush=True)
        if step >= args.steps:
            return points
        distiller.run(args.every)
        step += args.every


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--betas", nargs="+", type=float, default=[0.2, 0.5])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--texts", type=int, default=32, help="held-out texts of each kind")
    parser.add_argument("--adapter-layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--json", type=Path, default=REPO / "docs" / "bench" / "emulator_fidelity.json"
    )
    args = parser.parse_args(argv)
    rows = [row for beta in args.betas for row in curve(beta, args)]
    print("| β | step | public KL | public top-1 | task KL | task top-1 |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        keys = [f"{kind}_{metric}" for kind in ("public", "task") for metric in ("kl", "top1")]
        cells = [interval_cell(r, key, digits=2) for key in keys]
        print(f"| {r['beta']} | {r['step']} | {' | '.join(cells)} |")
    given = sys.argv[1:] if argv is None else argv
    document = {"command": " ".join(["python -m bench.emulator_fidelity", *given]), "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2))
    return document


if __name__ == "__main__":
    main()
