"""The alignment study on the embedded model: DPO after SFT, and the utility cost of
client-level DP, each measured on held-out data with intervals, in one resumable command.

    python -m bench.alignment_study                        # three runs, two at a time
    python -m bench.alignment_study --model tiny-llama --quick --out /tmp/alignment  # smoke

The README's FedBiAlign setting (SmolLM2-135M-Instruct, Banking77 SFT over 3 clients of
adapter depths 1, 2, 2 from their memory budgets, HH-RLHF harmless-base preference pairs on
partitions 0 and 1, 10 local steps of batch 4, lr 5e-4, seed 0) in three runs:

- ``align-nodp``: 2 SFT rounds, then 2 DPO rounds. Reward accuracy and margin of AdapEmu and
  AdapFu on every held-out pair (231), after SFT and after DPO, paired per pair
  (``bench.alignment_table``).
- ``sft-nodp`` and ``sft-dp``: 4 SFT rounds without and with client-level DP (clip 0.1,
  noise multiplier 1.0, δ 1e-5). The held-out Banking77 loss and label-ranking accuracy (300
  test texts) of each against the base, and DP against no DP paired per text
  (``bench.sweep_pairs``); ε after the last round.

Runs land in ``<out>/<name>/`` (finished ones are not run again). The report, its JSON and
each run's small files (config, metrics, per-text and per-pair scores) go to ``--docs``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("FEDBIOT_CACHE", str(REPO / ".cache" / "fedbiot"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench import alignment_table  # noqa: E402
from bench.federation_runs import run_federations, threads_per_run  # noqa: E402
from bench.heldout_eval import summarise as heldout_summary  # noqa: E402
from bench.heldout_eval import table as heldout_table  # noqa: E402
from bench.run_files import metrics_rows  # noqa: E402
from bench.sweep_pairs import MODELS, RUNS_HEADING, paired_runs, paired_table  # noqa: E402

CLIENTS = 3
# The README's FedBiAlign command (section "Value alignment"), all held-out pairs scored.
SETTING: dict[str, object] = {
    "method": "fedbialign",
    "depth-table": "1,2",
    "memory-budgets": "0:0.7,1:2.0,2:2.0",
    "preference-clients": "0,1",
    "local-steps": 10,
    "learning-rate": 5e-4,
    "open-ended-examples": 0,
    "preference-eval-pairs": 231,
    "checkpoint-every": 0,
    "seed": 0,
}
RUNS: dict[str, dict[str, object]] = {
    # DPO's measure is the held-out pairs; Banking77 accuracy is not ranked (the README's
    # command), the response loss is.
    "align-nodp": {"num-server-rounds": 4, "dpo-rounds": 2, "eval-generation-examples": 0},
    # DP needs the update-norm screen off (clipping bounds every update); both runs go without
    # it, so that the only difference between them is the DP layer. Accuracy by label ranking
    # on all 300 held-out texts.
    "sft-nodp": {
        "num-server-rounds": 4,
        "stage": "sft",
        "max-update-norm-ratio": 0.0,
        "eval-generation-examples": 300,
    },
    "sft-dp": {
        "num-server-rounds": 4,
        "stage": "sft",
        "max-update-norm-ratio": 0.0,
        "eval-generation-examples": 300,
        "dp-clipping-norm": 0.1,
        "dp-noise-multiplier": 1.0,
    },
}
# Smoke-test sizes: the tiny model, a few texts and pairs.
QUICK: dict[str, object] = {
    "local-steps": 2,
    "batch-size": 2,
    "seq-length": 48,
    "public-examples": 8,
    "eval-examples": 8,
    "fidelity-examples": 4,
    "preference-eval-pairs": 6,
    "prealign-steps": 2,
    "distill-steps": 1,
    "drop-rate": 0.5,
}
# Files of a run small enough to commit beside the report.
KEPT = ("config.json", "metrics.jsonl", "heldout.jsonl", "preference_heldout.jsonl")


def configs(args: argparse.Namespace, threads: int) -> list[dict[str, object]]:
    return [
        {
            **SETTING,
            "model": args.model,
            "data-dir": str(REPO / "data"),
            "output-dir": str(args.out),
            "run-name": name,
            "cache-dir": str(args.out / ".node-cache" / name),  # removed after the run
            "num-threads": threads,
            **(QUICK if args.quick else {}),
            **rounds,
        }
        for name, rounds in RUNS.items()
    ]


def report(out: Path, docs: Path, wall: dict[str, float], command: str) -> dict[str, object]:
    """``alignment.json`` (the DPO comparison, the DP comparison), ``report.md`` and the runs'
    small files under ``docs``."""
    dpo = [alignment_table.summarise(out / "align-nodp")]
    sft = [out / "sft-nodp", out / "sft-dp"]
    # Each run against its own base, not pooled: the two runs differ in their setting.
    against_base = {
        "runs": {
            k: v for run in sft for k, v in heldout_summary([run], list(MODELS))["runs"].items()
        },
        "pooled": {},
    }
    dp = paired_runs([out / "sft-dp"], [out / "sft-nodp"])
    if dp is None:
        raise SystemExit(f"{out}/sft-dp or sft-nodp: no AdapEmu or AdapFu scores to pair")
    epsilon = metrics_rows(out / "sft-dp")[-1].get("dp_epsilon")
    document = {
        "command": command,
        "setting": SETTING,
        "runs": RUNS,
        "wall_seconds": wall,
        "dpo": dpo,
        "sft_against_base": against_base,
        "dp_against_no_dp": {"sft-dp": {"reference": "sft-nodp", **dp}},
        "dp_epsilon": epsilon,
    }
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "alignment.json").write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    for name in RUNS:
        kept = docs / "runs" / name
        kept.mkdir(parents=True, exist_ok=True)
        for file in KEPT:
            if (out / name / file).is_file():
                shutil.copyfile(out / name / file, kept / file)
    (docs / "report.md").write_text(markdown(document))
    return document


def markdown(document: dict) -> str:
    """The report: both tables, ε, the wall times and the command."""
    epsilon = document["dp_epsilon"]
    minutes = ", ".join(
        f"{k} {v / 60:.0f} min" for k, v in sorted(document["wall_seconds"].items())
    )
    return "\n".join(
        [
            "# Alignment study: DPO after SFT, and client-level DP",
            "",
            f"Made by `{document['command']}` ({minutes}); the numbers are in "
            "`alignment.json`, each run's config (with package versions), metrics and "
            "per-text/per-pair scores in `runs/`.",
            "",
            "## DPO after SFT (`align-nodp`)",
            "",
            "Held-out HH-RLHF harmless-base pairs, before DPO (the last SFT round) and after "
            "it; reward β·log(π/π_ref) against the untrained network; 95 % intervals "
            "(Wilson for accuracy, bootstrap over pairs for the margin and for the paired "
            "differences):",
            "",
            alignment_table.table(document["dpo"]),
            "## Client-level DP (`sft-dp` against `sft-nodp`)",
            "",
            f"4 SFT rounds each; with DP, ε = {epsilon:.2f} at δ 1e-5 after the last round "
            "(RDP accountant, no sampling amplification). Held-out Banking77 against the "
            "base model in the same run:",
            "",
            heldout_table(document["sft_against_base"]),
            paired_table(document["dp_against_no_dp"], RUNS_HEADING),
        ]
    )


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (tiny models)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once")
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per run")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "alignment")
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "alignment")
    given = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    threads = threads_per_run(args.jobs)
    begin = time.perf_counter()
    failed = run_federations(configs(args, threads), args.out, CLIENTS, args.jobs, args.timeout)
    if failed:
        raise SystemExit(f"runs failed: {failed}")
    print(f"runs done in {time.perf_counter() - begin:.0f} s", flush=True)
    wall = json.loads((args.out / "wall_seconds.json").read_text())
    command = " ".join(["python -m bench.alignment_study", *given])
    document = report(args.out, args.docs, wall, command)
    print((args.docs / "report.md").read_text())
    return document


if __name__ == "__main__":
    main()
