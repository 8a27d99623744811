"""The seeds' claims, each checked on SmolLM2 and Banking77 with paired intervals.

Claims: AdapFu > AdapEmu, and FedBiOT's AdapFu >= FedOT's and offsite-tuning's (FedBiOT,
Table 2); federated > local-only (OpenFedLLM); parameter averaging > split learning > KD
(the framework-comparison seed). Methods: FedBiOT (beta 0.2 and 0.5), FedOT and
offsite-tuning (beta 0.2, FedBiOT's comparison at equal compression), FedIT, local-only,
central, KD-FedLLM and split learning (at half the blocks); partitions IID and
Dirichlet(0.5) over the intent label; three seeds; one client budget for every method
(3 clients x rounds x local steps x batch; the single-client methods, offsite-tuning and
central, take the three clients' steps on the union of the data, so they run once per seed,
whatever the partition). Every run goes through ``flwr run`` with three
SuperNodes, and evaluates after its last round on the same Banking77 test texts (held-out
loss on ``eval-examples``, exact label ranking on the first ``eval-generation-examples``).

    python -m bench.fedbiot_claims                    # everything, two runs at a time
    python -m bench.fedbiot_claims --seeds 0 --partitions iid     # a part; reruns resume
    python -m bench.fedbiot_claims --model tiny-llama --quick --out /tmp/claims   # smoke test

Per text, scores are summed over seeds (losses as NLL and token sums, accuracy as the number
of seeds that rank the gold label first), so every interval resamples texts, and every
comparison pairs two methods on the same texts and seeds. ``<out>/claims.json`` holds the
table and the verdicts; ``<out>/claims.md`` is the report, ``claims.png`` its figure. The
report covers every row and partition finished in ``<out>/runs`` for all the ``--seeds``
given, not only the ``--rows`` just run, so a grid run in parts reports as a whole.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("FEDBIOT_CACHE", str(REPO / ".cache" / "fedbiot"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.claims_plot import write_plot  # noqa: E402
from bench.claims_report import claims, model_table, run_budget, write_report  # noqa: E402
from bench.federation_runs import finished, run_federations, threads_per_run  # noqa: E402

CLIENTS = 3
SEEDS = (0, 1, 2)
PARTITIONS: dict[str, dict[str, object]] = {
    "iid": {"partitioner": "iid"},
    "dirichlet": {"partitioner": "dirichlet", "dirichlet-alpha": 0.5},
}
ROWS: dict[str, dict[str, object]] = {
    "fedbiot-b0.2": {"method": "fedbiot", "drop-rate": 0.2},
    "fedbiot-b0.5": {"method": "fedbiot", "drop-rate": 0.5},
    "fedot": {"method": "fedot", "drop-rate": 0.2},
    "offsite": {"method": "offsite", "drop-rate": 0.2},
    "fedit": {"method": "fedit"},
    "local": {"method": "local"},
    "central": {"method": "central"},
    # The framework comparison's seed (parameter averaging > split > KD on Banking77), with
    # the same evaluation and client budget: KD-FedLLM, and split learning at half the blocks.
    "kdfed": {"method": "kdfed"},
    "split": {"method": "split"},
}
SINGLE_CLIENT = ("offsite", "central")
COMMON: dict[str, object] = {
    "task": "banking77",
    "eval-split": "test",
    "eval-examples": 1000,
    "eval-generation-examples": 300,
    "banking77-eval": "rank",
    "eval-every": 0,
    "num-partitions": CLIENTS,
    "num-server-rounds": 3,
    "local-steps": 10,
    "batch-size": 4,
    "seq-length": 128,
    "learning-rate": 1e-3,
    "prealign-steps": 100,
    "fraction-evaluate": 0.0,
    "open-ended-examples": 0,
    "checkpoint-every": 0,
}
QUICK: dict[str, object] = {
    "eval-examples": 6,
    "eval-generation-examples": 4,
    "num-server-rounds": 1,
    "local-steps": 2,
    "batch-size": 2,
    "seq-length": 96,
    "prealign-steps": 2,
    "distill-steps": 1,
    "public-examples": 8,
    "kd-public-examples": 8,
}


def run_name(row: str, partition: str, seed: int) -> str:
    return f"{row}-{'all' if row in SINGLE_CLIENT else partition}-s{seed}"


def run_config(
    args: argparse.Namespace, row: str, partition: str, seed: int, runs: Path, threads: int
) -> dict[str, object]:
    sizes = {**COMMON, **(QUICK if args.quick else {})}
    budget = {"local-steps": int(sizes["local-steps"]) * CLIENTS} if row in SINGLE_CLIENT else {}
    name = run_name(row, partition, seed)
    return {
        "model": args.model,
        **sizes,
        **PARTITIONS[partition],
        **ROWS[row],
        **budget,
        "seed": seed,
        "output-dir": str(runs),
        "run-name": name,
        "data-dir": str(REPO / "data"),
        "cache-dir": str(runs / ".node-cache" / name),
        "num-threads": threads,
    }


def finished_cells(runs: Path, seeds: list[int], rounds: int) -> dict[tuple[str, str], list[Path]]:
    """(row, partition) -> its run folders, for every cell whose runs of all ``seeds`` have
    finished: a comparison then pairs the same seeds on both sides."""
    cells = {}
    for partition in PARTITIONS:
        for row in ROWS:
            dirs = [runs / run_name(row, partition, seed) for seed in seeds]
            if all(finished(d, rounds) for d in dirs):
                cells[(row, partition)] = dirs
    # The single-client rows' runs serve every partition: list them under the partitions
    # whose federated rows ran.
    ran = {p for (row, p) in cells if row not in SINGLE_CLIENT}
    return {(row, p): dirs for (row, p), dirs in cells.items() if p in ran}


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (tiny models)")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument(
        "--partitions", nargs="+", choices=list(PARTITIONS), default=list(PARTITIONS)
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=7200, help="seconds per run")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "fedbiot-claims")
    args = parser.parse_args(argv)
    threads = threads_per_run(args.jobs)
    runs = args.out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    configs: dict[str, dict[str, object]] = {}
    for seed in args.seeds:
        for partition in args.partitions:
            for row in args.rows:
                config = run_config(args, row, partition, seed, runs, threads)
                configs[str(config["run-name"])] = config
    failed = run_federations(list(configs.values()), args.out, CLIENTS, args.jobs, args.timeout)
    wall = json.loads((args.out / "wall_seconds.json").read_text())
    rounds = int({**COMMON, **(QUICK if args.quick else {})}["num-server-rounds"])
    cells = finished_cells(runs, args.seeds, rounds)
    table = model_table(cells, wall, CLIENTS)
    document = {
        "model": args.model,
        "clients": CLIENTS,
        "seeds": args.seeds,
        "settings": {**COMMON, **(QUICK if args.quick else {})},
        "rows": {row: ROWS[row] for row in dict.fromkeys(r for r, _ in cells)},
        "partitions": {p: PARTITIONS[p] for p in dict.fromkeys(p for _, p in cells)},
        "table": table,
        "claims": claims(cells, list(dict.fromkeys(p for _, p in cells))),
        "failed_runs": failed,
        "wall_seconds": wall,
        "budget": run_budget(cells, wall),
        "command": " ".join(
            ["python -m bench.fedbiot_claims", *(sys.argv[1:] if argv is None else argv)]
        ),
    }
    (args.out / "claims.json").write_text(json.dumps(document, indent=2, sort_keys=True))
    report = write_report(document, args.out / "claims.md")
    write_plot(document, args.out / "claims.png")  # after the report: a plot error loses no table
    print(report.read_text())
    if failed:
        raise SystemExit(f"runs failed: {failed}")
    return report


if __name__ == "__main__":
    main()
