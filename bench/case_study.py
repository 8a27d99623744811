"""The three-framework case study on Banking77, reproduced at a reduced size in one command.

Seed: "Federated Fine-Tuning of LLMs: Framework Comparison and Research Directions" (parameter
averaging vs knowledge distillation vs split learning, Banking77, 3 clients of 1,667 training
examples, GPT-2). Here the embedded SmolLM2-135M-Instruct replaces GPT-2, and FedBiOT is a
fourth row. Every run goes through `flwr run` on a local simulation SuperLink with three
SuperNodes, exactly as a user would start it:

    python -m bench.case_study                                  # the reduced table
    python -m bench.case_study --model tiny-llama --quick --out /tmp/case-study   # smoke test

Rows: ``fedit-r4/r8/r16`` (parameter averaging, FedAvg, LoRA rank sweep), ``kdfed``,
``split-q1/q2/q3`` (split after a quarter, half, three quarters of the blocks), ``fedbiot``;
each for seeds 0, 1 and 42. Runs land in ``<out>/runs/<row>-s<seed>/``; a finished run is
not run again, so an interrupted study resumes. ``--jobs 2`` (the default) keeps two runs
going at once, each on its own local SuperLink with one torch thread per core it gets: one
run's start-up, model shipping and message waits then overlap the other's compute.
``<out>/report.md`` (table, sweeps, the comparison with the seed's ranking, the whole
study's wall time), its PNG plots and ``case_study.json`` come from
``bench/case_study_report.py``.

Clients: the three SuperNodes each hold a third of the 10,003 training texts (1% of them
held out for client-side evaluation): the simulation engine gives every node
``num-partitions=3`` in its node config, which wins over the run config's. The study in
``docs/case-study.md`` ran before that, with run-config ``num-partitions=6`` giving each
client a sixth (1,667, the seed's client size) and leaving half of the texts untrained.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from transformers import AutoConfig

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("FEDBIOT_CACHE", str(REPO / ".cache" / "fedbiot"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.case_study_report import write_report  # noqa: E402
from bench.federation_runs import finished, run_federations, threads_per_run  # noqa: E402
from models.loading import load_model, resolve_model_dir  # noqa: E402
from server_app.evaluation.tasks import banking77  # noqa: E402

SEEDS = (0, 1, 42)
CLIENTS = 3
ROWS = ("fedit-r4", "fedit-r8", "fedit-r16", "kdfed", "split-q1", "split-q2", "split-q3", "fedbiot")

# The reduced size (the seed trains for epochs over 5,000 examples and tests on all 3,080).
REDUCED = {
    "num-server-rounds": 2,
    "local-steps": 4,
    "batch-size": 4,
    "seq-length": 96,
    "learning-rate": 1e-3,
    "eval-examples": 8,
    "eval-generation-examples": 16,
    "eval-max-new-tokens": 16,
    "kd-public-examples": 8,
    "kd-distill-steps": 4,
    "public-examples": 16,
    "prealign-steps": 4,
    "distill-steps": 2,
}
# The smoke test: the whole pipeline in minutes on a tiny model.
QUICK = {
    "num-server-rounds": 1,
    "local-steps": 2,
    "batch-size": 2,
    "seq-length": 96,
    "learning-rate": 1e-3,
    "eval-examples": 2,
    "eval-generation-examples": 4,
    "eval-max-new-tokens": 8,
    "kd-public-examples": 2,
    "kd-distill-steps": 1,
    "public-examples": 4,
    "prealign-steps": 1,
    "distill-steps": 1,
}


def num_blocks(model: str) -> int:
    return int(AutoConfig.from_pretrained(resolve_model_dir(model)).num_hidden_layers)


def row_config(row: str, blocks: int) -> dict[str, object]:
    """The run-config keys that make a row what it is."""
    if row.startswith("fedit-r"):
        return {"method": "fedit", "lora-r": int(row.removeprefix("fedit-r"))}
    if row.startswith("split-q"):
        quarter = int(row.removeprefix("split-q"))
        return {"method": "split", "split-point": max(1, round(blocks * quarter / 4))}
    return {"method": row}


def run_config(
    args: argparse.Namespace, row: str, seed: int, blocks: int, runs: Path, threads: int
) -> dict[str, object]:
    name = f"{row}-s{seed}"
    return {
        "model": args.model,
        "task": "banking77",
        "test-fraction": 0.01,
        "seed": seed,
        "lora-r": 8,
        "eval-every": 0,  # task metrics after the last round only; the base once per seed
        "banking77-eval": "rank",  # accuracy over the 77 labels: a few steps name none right
        "fraction-evaluate": 0.0,  # no client-side evaluation round: its traffic is no training
        "open-ended-examples": 0,
        "checkpoint-every": 0,
        "output-dir": str(runs),
        "run-name": name,
        "data-dir": str(REPO / "data"),
        "cache-dir": str(runs / ".node-cache" / name),  # removed after the run
        "num-threads": threads,
        **(QUICK if args.quick else REDUCED),
        **row_config(row, blocks),
    }


def base_accuracy(model: str, seed: int, size: int, data_dir: Path) -> float:
    """The untrained model's accuracy on a seed's test texts, once for all rows (every row
    starts from it; each run then evaluates only after its last round)."""
    base, tokenizer = load_model(model)
    result = banking77(base, tokenizer, size=size, seed=seed, mode="rank", data_dir=str(data_dir))
    return float(result["accuracy"])


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (tiny models)")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument(
        "--jobs", type=int, default=2, help="runs at once, each on its own local SuperLink"
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per run (0: torch's threads / jobs)"
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "case-study")
    args = parser.parse_args(argv)
    threads = args.threads or threads_per_run(args.jobs)

    runs = args.out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    blocks = num_blocks(args.model)
    rounds = int((QUICK if args.quick else REDUCED)["num-server-rounds"])
    configs = [
        run_config(args, row, seed, blocks, runs, threads)
        for seed in args.seeds
        # The longest rows first, so that the last job to finish is a short one.
        for row in sorted(args.rows, key=lambda r: r != "kdfed")
    ]
    pending = [c for c in configs if not finished(runs / str(c["run-name"]), rounds)]
    start = time.perf_counter()
    failed = run_federations(configs, args.out, CLIENTS, args.jobs, args.timeout)
    if failed:
        raise SystemExit(f"runs failed: {failed}")
    wall = json.loads((args.out / "wall_seconds.json").read_text())
    study_seconds = time.perf_counter() - start
    sizes = QUICK if args.quick else REDUCED
    base_file = args.out / "base_accuracy.json"
    base = json.loads(base_file.read_text()) if base_file.is_file() else {}
    for seed in args.seeds:
        if str(seed) not in base:
            size = int(sizes["eval-generation-examples"])
            base[str(seed)] = base_accuracy(args.model, seed, size, REPO / "data")
            base_file.write_text(json.dumps(base, indent=2, sort_keys=True))
    settings = {
        "model": args.model,
        "jobs": args.jobs,
        "threads_per_run": threads,
        "study_wall_seconds": study_seconds if pending else None,
        "base_accuracy": base,
        "blocks": blocks,
        "clients": CLIENTS,
        "sizes": sizes,
    }
    report = write_report(runs, args.out, settings, wall, list(ROWS), list(SEEDS))
    print(f"wrote {report}")
    return report


if __name__ == "__main__":
    main()
