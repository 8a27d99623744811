"""FedBiOT's recipe on SmolLM2 and Banking77: which settings make AdapFu beat the base.

Every point is one ``flwr run`` (two SuperNodes, the same client budget for every point) that
evaluates on the **validation** part of Banking77's training split (``eval-split=validation``:
500 texts no client trains on, the first 200 also ranked over the 77 labels), never on the
test split. Two references: FedIT (LoRA on every block of the full model, OpenFedLLM's
method) for what the same client budget buys without compression, and ``b0.0`` (FedBiOT with
no block dropped, so the emulator is exact and AdapEmu is AdapFu) for what the two adapter
blocks alone can learn.

    python -m bench.fedbiot_sweep                       # every point, two runs at a time
    python -m bench.fedbiot_sweep --points fedit b0.2-p100
    python -m bench.fedbiot_sweep --task gsm8k          # the generation task: GSM8K_POINTS
    python -m bench.fedbiot_sweep --model tiny-llama --quick --out /tmp/sweep   # smoke test

Finished points are kept (``<out>/runs/<point>/``), so an interrupted sweep resumes.
``<out>/sweep.json`` holds every point's AdapEmu and AdapFu loss and accuracy with 95 %
intervals and paired differences against the base, and, for a setting run with several
seeds (``SEED_GROUPS``), the same pooled per text over the seeds; ``<out>/sweep.md`` is the
table. Every finished point's per-text scores are kept in ``<out>/heldout/<point>/``.
``--task gsm8k`` sweeps the generation task the same way, on held-out response loss only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("FEDBIOT_CACHE", str(REPO / ".cache" / "fedbiot"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.claims_report import pooled_against_base  # noqa: E402
from bench.federation_runs import run_federations, threads_per_run  # noqa: E402
from bench.run_files import metrics_rows  # noqa: E402
from bench.sweep_pairs import (  # noqa: E402
    GROUPS_HEADING,
    paired_groups,
    paired_points,
    paired_table,
)
from bench.sweep_tables import pooled_table, table  # noqa: E402

CLIENTS = 2
# One client budget for every point: 4 rounds x 10 steps x batch 4 per client.
COMMON = {
    "task": "banking77",
    "eval-split": "validation",
    "eval-examples": 500,
    "eval-generation-examples": 200,
    "banking77-eval": "rank",
    "eval-every": 0,
    "num-partitions": CLIENTS,
    "num-server-rounds": 4,
    "local-steps": 10,
    "batch-size": 4,
    "seq-length": 128,
    "learning-rate": 1e-3,
    "fraction-evaluate": 0.0,
    "open-ended-examples": 0,
    "checkpoint-every": 0,
    "seed": 0,
}
# The generation task: GSM8K's chain-of-thought answers, scored by held-out response loss on
# the same 500 validation texts for every point (SmolLM2-135M solves almost none, so accuracy
# would not tell points apart); 256 tokens hold most question-answer pairs whole.
GSM8K_COMMON = {
    **{key: value for key, value in COMMON.items() if key != "banking77-eval"},
    "task": "gsm8k",
    "seq-length": 256,
}
TASKS = {"banking77": COMMON, "gsm8k": GSM8K_COMMON}
# What a task fixes whatever the sizes, applied after QUICK: the GSM8K sweep never generates,
# not even in a smoke test.
FIXED: dict[str, dict[str, object]] = {
    "banking77": {},
    "gsm8k": {"eval-generation-examples": 0},
}
QUICK = {
    "eval-examples": 8,
    "eval-generation-examples": 4,
    "num-server-rounds": 1,
    "local-steps": 2,
    "batch-size": 2,
    "public-examples": 8,
}
# Point name -> the keys that make it; bN: drop rate, pN: pre-alignment steps, aN: adapter
# blocks, dN: distillation steps per round, sN: local steps per round (s40: four times the
# common client budget, for FedIT and FedBiOT alike), lrN: client learning rate, seedN: the
# run's seed (COMMON's is 0).
# Item 9 of docs/fedbiot-recipe.md: the smallest setting whose AdapFu beats the base.
ITEM9 = "b0.2-p100-a8-lr3e-3-s40"
ITEM9_SETTING = {
    "drop-rate": 0.2,
    "prealign-steps": 100,
    "adapter-layers": 8,
    "learning-rate": 3e-3,
    "local-steps": 40,
}
# Distillation knobs changed one at a time from item 9: dN distillation steps per round,
# dlrN the distillation learning rate, lamN the KL weight λ, l2raw the paper's raw
# hidden-state term instead of the relative one.
KNOBS: dict[str, dict[str, object]] = {
    "d20": {"distill-steps": 20},
    "dlr3e-3": {"distill-lr": 3e-3},
    "lam0": {"kd-lambda": 0.0},
    "l2raw": {"distill-hidden-norm": "raw"},
}
POINTS: dict[str, dict[str, object]] = {
    "fedit": {"method": "fedit"},
    "b0.0": {"drop-rate": 0.0, "prealign-steps": 0},
    "b0.5-p20": {"drop-rate": 0.5, "prealign-steps": 20},
    "b0.2-p20": {"drop-rate": 0.2, "prealign-steps": 20},
    "b0.5-p100": {"drop-rate": 0.5, "prealign-steps": 100},
    "b0.2-p100": {"drop-rate": 0.2, "prealign-steps": 100},
    "b0.2-p300": {"drop-rate": 0.2, "prealign-steps": 300},
    "b0.1-p100": {"drop-rate": 0.1, "prealign-steps": 100},
    "b0.2-p100-a4": {"drop-rate": 0.2, "prealign-steps": 100, "adapter-layers": 4},
    "b0.2-p100-d20": {"drop-rate": 0.2, "prealign-steps": 100, "distill-steps": 20},
    "fedit-s40": {"method": "fedit", "local-steps": 40},
    "b0.2-p100-s40": {"drop-rate": 0.2, "prealign-steps": 100, "local-steps": 40},
    "b0.2-p100-a8-s40": {
        "drop-rate": 0.2,
        "prealign-steps": 100,
        "adapter-layers": 8,
        "local-steps": 40,
    },
    "b0.2-p100-a8-d20-s40": {
        "drop-rate": 0.2,
        "prealign-steps": 100,
        "adapter-layers": 8,
        "distill-steps": 20,
        "local-steps": 40,
    },
    "b0.2-p100-a8": {"drop-rate": 0.2, "prealign-steps": 100, "adapter-layers": 8},
    "b0.2-p100-a8-lr3e-3": {
        "drop-rate": 0.2,
        "prealign-steps": 100,
        "adapter-layers": 8,
        "learning-rate": 3e-3,
    },
    ITEM9: ITEM9_SETTING,
    # Item 9's setting again with other seeds (LoRA init, partition, batch order); the
    # validation texts do not depend on the seed, so every seed is paired on the same texts.
    **{f"{ITEM9}-seed{seed}": {**ITEM9_SETTING, "seed": seed} for seed in (1, 2)},
    # Item 9's setting with one distillation knob changed (seed 0).
    **{f"{ITEM9}-{knob}": {**ITEM9_SETTING, **change} for knob, change in KNOBS.items()},
    # The distillation-steps knob with item 9's other seeds.
    **{
        f"{ITEM9}-d20-seed{seed}": {**ITEM9_SETTING, **KNOBS["d20"], "seed": seed}
        for seed in (1, 2)
    },
    # Item 9 with non-IID clients: Dirichlet (α = 0.5) over the 77 labels, three seeds (the
    # seed also draws the partition).
    f"{ITEM9}-dirichlet": {**ITEM9_SETTING, "partitioner": "dirichlet"},
    **{
        f"{ITEM9}-dirichlet-seed{seed}": {**ITEM9_SETTING, "partitioner": "dirichlet", "seed": seed}
        for seed in (1, 2)
    },
}


# The GSM8K sweep's points: FedIT, FedBiOT at the default run's β and pre-alignment, β 0.5,
# longer pre-alignment, and the adapter size (pre-alignment at 256 tokens costs about three
# times Banking77's per step, so the longer points come last).
GSM8K_POINTS = ("fedit", "b0.2-p20", "b0.5-p20", "b0.2-p100", "b0.2-p100-a8")

# Settings run with more than one seed: their per-text scores are pooled over the seeds. A
# group's name says its seeds, so that it never reads as its seed-0 point's.
ITEM9_SEEDS = f"{ITEM9}-seeds0-2"
D20_SEEDS = f"{ITEM9}-d20-seeds0-2"
DIRICHLET_SEEDS = f"{ITEM9}-dirichlet-seeds0-2"
SEED_GROUPS: dict[str, tuple[str, ...]] = {
    ITEM9_SEEDS: (ITEM9, f"{ITEM9}-seed1", f"{ITEM9}-seed2"),
    D20_SEEDS: (f"{ITEM9}-d20", f"{ITEM9}-d20-seed1", f"{ITEM9}-d20-seed2"),
    DIRICHLET_SEEDS: (
        f"{ITEM9}-dirichlet",
        f"{ITEM9}-dirichlet-seed1",
        f"{ITEM9}-dirichlet-seed2",
    ),
}
# Per task, point -> the point it changes one knob of: their difference is reported paired
# per text (bench/sweep_pairs.py).
AGAINST: dict[str, dict[str, str]] = {
    "banking77": {
        **{f"{ITEM9}-{knob}": ITEM9 for knob in KNOBS},
        f"{ITEM9}-dirichlet": ITEM9,
        "b0.2-p100-d20": "b0.2-p100",
    },
    "gsm8k": {"b0.5-p20": "b0.2-p20", "b0.2-p100": "b0.2-p20", "b0.2-p100-a8": "b0.2-p100"},
}
# Seed group -> the seed group it changes one knob of, paired per text over the seeds.
GROUPS_AGAINST = {D20_SEEDS: ITEM9_SEEDS, DIRICHLET_SEEDS: ITEM9_SEEDS}


def common(task: str, quick: bool) -> dict:
    """The settings every point of ``task`` shares (smoke-test sizes with ``quick``)."""
    return {**TASKS[task], **(QUICK if quick else {}), **FIXED[task]}


def point_config(name: str, args: argparse.Namespace, runs: Path, threads: int) -> dict:
    point = {"method": "fedbiot", **POINTS[name]}
    if args.quick and "prealign-steps" in point:
        point["prealign-steps"] = 2
    if args.quick:
        point.pop("local-steps", None)
    return {
        "model": args.model,
        **common(args.task, args.quick),
        **point,
        "output-dir": str(runs),
        "run-name": name,
        "data-dir": str(REPO / "data"),
        "cache-dir": str(runs / ".node-cache" / name),
        "num-threads": threads,
    }


def last_row(run_dir: Path) -> dict | None:
    rows = metrics_rows(run_dir, missing_ok=True)
    return rows[-1] if rows else None


def collect(runs: Path, names: list[str], config: dict) -> dict:
    """Every finished point's held-out metrics (the last row's ``eval_*`` keys)."""
    points = {}
    for name in names:
        row = last_row(runs / name)
        if row is None or row["round"] != config["num-server-rounds"]:
            continue
        points[name] = {
            "config": {"method": "fedbiot", **POINTS[name]},
            "metrics": {k: v for k, v in row.items() if k.startswith("eval_")},
        }
    return points


def previous_sweep(path: Path, model: str, common: dict) -> dict:
    """An earlier ``sweep.json`` (copy ``docs/fedbiot-recipe/sweep.json`` into
    ``--out`` to extend the committed sweep): a sweep can then run in parts on different
    machines, and a point whose run folder is gone keeps its measured metrics. Points of
    another model or other common settings would not compare, so such a file is refused."""
    if not path.is_file():
        return {}
    try:
        document = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SystemExit(f"{path}: not JSON ({error})") from None
    if not isinstance(document, dict) or not isinstance(document.get("points", {}), dict):
        raise SystemExit(f"{path}: not a sweep.json (no 'points' object)")
    differ = [key for key in sorted(set(common) | set(document.get("common", {})))
              if common.get(key) != document.get("common", {}).get(key)]  # fmt: skip
    if document.get("model") != model:
        differ.insert(0, "model")
    if differ:
        raise SystemExit(f"{path} was made with other settings ({', '.join(differ)}): "
                         "choose another --out")  # fmt: skip
    return document


def keep_scores(runs: Path, heldout: Path, names: list[str]) -> None:
    """Copy each finished point's per-text scores (``heldout.jsonl``, a few hundred kB) to
    ``heldout/<point>/``: they outlive the multi-GB run folders and are committed with the
    sweep, so pooling over seeds can be redone from the repository."""
    for name in names:
        source = runs / name / "heldout.jsonl"
        if source.is_file():
            (heldout / name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, heldout / name / "heldout.jsonl")


def pooled_groups(heldout: Path) -> dict[str, dict]:
    """For every seed group whose points all kept their scores: AdapEmu's and AdapFu's loss
    and accuracy with per-text scores summed over the seeds, each with a bootstrap interval
    over texts and the paired difference against the base scored in the same runs
    (``bench.claims_report.pooled_against_base``), keys prefixed with the model."""
    out = {}
    for group, names in SEED_GROUPS.items():
        dirs = [heldout / name for name in names]
        models = pooled_against_base(dirs, ["adapemu", "adapfu"])
        if models is None:
            continue
        base = models["base"]
        entry: dict[str, object] = {
            "points": list(names),
            "texts": base["loss_examples"],
            "ranked_texts": base["accuracy_examples"],
        }
        for model, values in models.items():
            entry.update(
                {f"{model}_{key}": value for key, value in values.items() if "examples" not in key}
            )
        out[group] = entry
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (tiny models)")
    parser.add_argument("--task", choices=list(TASKS), default="banking77")
    parser.add_argument("--points", nargs="+", choices=list(POINTS), default=None,
                        help="default: every point (Banking77) or GSM8K_POINTS")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=5400, help="seconds per run")
    parser.add_argument(
        "--out", type=Path, help="default: results/fedbiot-sweep (-gsm8k for that task)"
    )
    args = parser.parse_args(argv)
    gsm8k = args.task == "gsm8k"
    if args.points is None:
        args.points = list(GSM8K_POINTS if gsm8k else POINTS)
    if args.out is None:
        args.out = REPO / "results" / ("fedbiot-sweep-gsm8k" if gsm8k else "fedbiot-sweep")
    threads = threads_per_run(args.jobs)
    runs = args.out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    config = common(args.task, args.quick)
    previous = previous_sweep(args.out / "sweep.json", args.model, config)
    configs = [point_config(name, args, runs, threads) for name in args.points]
    run_federations(configs, args.out, CLIENTS, args.jobs, args.timeout)
    wall = {
        **previous.get("wall_seconds", {}),
        **json.loads((args.out / "wall_seconds.json").read_text()),
    }
    merged = {**previous.get("points", {}), **collect(runs, list(POINTS), config)}
    points = {name: merged[name] for name in POINTS if name in merged}
    keep_scores(runs, args.out / "heldout", list(points))
    groups = pooled_groups(args.out / "heldout")
    paired = paired_points(args.out / "heldout", AGAINST[args.task])
    paired_pooled = paired_groups(args.out / "heldout", GROUPS_AGAINST, SEED_GROUPS)
    document = {"model": args.model, "common": config, "clients": CLIENTS,
                "wall_seconds": wall, "points": points, "pooled": groups,
                "paired": paired, "paired_pooled": paired_pooled}  # fmt: skip
    (args.out / "sweep.json").write_text(json.dumps(document, indent=2, sort_keys=True))
    report = args.out / "sweep.md"
    report.write_text(table(points, args.task) + pooled_table(groups) + paired_table(paired)
                      + paired_table(paired_pooled, GROUPS_HEADING))  # fmt: skip
    print(report.read_text())
    missing = [n for n in args.points if n not in points]
    if missing:
        raise SystemExit(f"points without a finished run: {missing}")
    return report


if __name__ == "__main__":
    main()
