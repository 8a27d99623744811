"""How a federation's cost grows with the number of simulated SuperNodes N, with a fixed
number sampled per round: one real ``flwr run`` per N on its own SuperLink, each with a fresh
weight store, reporting wall time per round, server and client peak memory, the disk the
nodes' caches hold at the end, and the bytes of weights a deployment would download against
those actually sent.

    python -m bench.scale                               # SmolLM2, N = 10, 100, 1000, 10 a round
    python -m bench.scale --model tiny-llama --nodes 100 --per-round 50 --json /tmp/s.json
    python -m bench.scale --quick --model tiny-llama --nodes 6 --per-round 2 --json /tmp/s.json
    python -m bench.scale --model tiny-llama --nodes 100 --rounds 20 --json /tmp/s20.json

The goal is flat in N: a round costs what its sampled clients cost, and the nodes of one host
keep one copy of the weights (``client_app/weight_store.py``), however many nodes there are.
Each node trains the partition Flower's simulation engine gives it (its node config's
``partition-id`` of ``num-partitions`` = N); the run config sets none. Finished N are kept in
``--json`` and skipped, so the bench resumes. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("FEDBIOT_CACHE", str(REPO / ".cache" / "fedbiot"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.federation_runs import finished  # noqa: E402
from bench.run_files import metrics_rows  # noqa: E402
from tests.flower_runtime import local_federation, tiny_run_config  # noqa: E402

# Every N trains the same rounds and steps; only the population from which clients are
# sampled grows. No evaluation beyond the last round's held-out loss: it does not grow with N.
COMMON = {
    "num-server-rounds": 3,
    "local-steps": 10,
    "fraction-evaluate": 0.0,
    "eval-every": 0,
    "eval-examples": 32,
    "eval-generation-examples": 0,
    "open-ended-examples": 0,
    "checkpoint-every": 0,
    "cache-ephemeral": 0,  # the disk the caches hold at the end is what is measured
}
QUICK = {"num-server-rounds": 2, "local-steps": 2}


def disk_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (each hard link once)."""
    seen, total = set(), 0
    for path in folder.rglob("*") if folder.is_dir() else []:
        if path.is_file() and not path.is_symlink():
            stat = path.stat()
            if (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_size
    return total


def rounds_of(args: argparse.Namespace) -> dict[str, int]:
    """``--rounds``, where given, in place of the default rounds (e.g. a 20-round run to see
    the nodes' disk after many rounds)."""
    return {"num-server-rounds": args.rounds} if args.rounds else {}


def config_for(nodes: int, args: argparse.Namespace, out: Path) -> dict[str, object]:
    name = f"n{nodes}"
    base = tiny_run_config(out, name) if args.model.startswith("tiny") else {
        "output-dir": str(out), "run-name": name, "data-dir": str(REPO / "data"),
        "cache-dir": str(out / f"{name}-node-cache"),
    }  # fmt: skip
    return {
        **base,
        "model": args.model,
        **COMMON,
        **(QUICK if args.quick else {}),
        **rounds_of(args),
        "fraction-train": args.per_round / nodes,
        "min-train-nodes": args.per_round,
        "seed": args.seed,
    }


def summarise(rows: list[dict], cache_bytes: int, wall_s: float, nodes: int) -> dict:
    """One N's numbers from its ``metrics.jsonl`` rows and what the bench measured."""
    trained = [r for r in rows if r["round"] >= 1]
    # A round's wall time without the last round's held-out evaluation (the same for every N).
    per_round = [
        b["elapsed_s"] - a["elapsed_s"] - b.get("time_eval_s", 0.0)
        for a, b in itertools.pairwise(rows)
    ]
    return {
        "nodes": nodes,
        "clients_per_round": [r["clients_sampled"] for r in trained],
        "clients_failed": sum(r.get("clients_failed", 0) for r in trained),
        # Round 1 ships the weights; later rounds show the steady state.
        "round_1_s": per_round[0],
        "later_round_s": sum(per_round[1:]) / max(1, len(per_round) - 1),
        "server_peak_mb": max(r["server_peak_rss_mb"] for r in rows),
        "client_peak_mb": max(r.get("client_peak_rss_mb", 0.0) for r in trained),
        "cache_disk_bytes": cache_bytes,
        "weights_download_bytes": sum(r.get("bytes_model_download", 0) for r in trained),
        "weights_sent_bytes": sum(r.get("bytes_model_download_sent", 0) for r in trained),
        "run_wall_s": wall_s,
    }


def measure(nodes: int, args: argparse.Namespace) -> dict:
    out = args.out / "runs"
    config = config_for(nodes, args, out)
    run, cache = out / str(config["run-name"]), Path(str(config["cache-dir"]))
    shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    with local_federation(args.out / f".flwr-home-n{nodes}") as federation:
        start = time.perf_counter()
        result = federation.run(config, supernodes=nodes, timeout=args.timeout)
        wall = time.perf_counter() - start
    rounds = int(config["num-server-rounds"])
    if result.returncode or not finished(run, rounds):
        sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
        raise SystemExit(f"N={nodes}: the run did not finish (see {run})")
    rows = metrics_rows(run)
    summary = summarise(rows, disk_bytes(cache), wall, nodes)
    shutil.rmtree(cache, ignore_errors=True)  # N=1000 leaves its nodes' folders otherwise
    return summary


def table(results: list[dict]) -> str:
    lines = [
        "| N | clients a round | failed | round 1 s | later rounds s | server peak MB "
        "| client peak MB (mean) | cache disk MB | weights download MB | weights sent MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['nodes']} | {'/'.join(map(str, r['clients_per_round']))} "
            f"| {r['clients_failed']} | {r['round_1_s']:.1f} | {r['later_round_s']:.1f} "
            f"| {r['server_peak_mb']:.0f} | {r['client_peak_mb']:.0f} "
            f"| {r['cache_disk_bytes'] / 2**20:.0f} | {r['weights_download_bytes'] / 2**20:.0f} "
            f"| {r['weights_sent_bytes'] / 2**20:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nodes", nargs="+", type=int, default=[10, 100, 1000])
    parser.add_argument("--per-round", type=int, default=10, help="clients sampled a round")
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=0, help="rounds (0: 3, quick: 2)")
    parser.add_argument("--timeout", type=float, default=5400, help="seconds per run")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "scale")
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "bench" / "scale.json")
    args = parser.parse_args(argv)
    if any(n < args.per_round for n in args.nodes):
        parser.error(f"every --nodes value must be at least --per-round={args.per_round}")
    given = sys.argv[1:] if argv is None else argv
    settings = {"model": args.model, "per_round": args.per_round, "quick": args.quick,
                "seed": args.seed, **COMMON, **(QUICK if args.quick else {}),
                **rounds_of(args)}  # fmt: skip
    document = json.loads(args.json.read_text()) if args.json.is_file() else {}
    kept = document.get("results", []) if document.get("settings") == settings else []
    done = {r["nodes"]: r for r in kept}
    for nodes in args.nodes:
        if nodes not in done:
            done[nodes] = measure(nodes, args)
            results = sorted(done.values(), key=lambda r: r["nodes"])
            command = " ".join(["python -m bench.scale", *given])
            document = {"command": command, "settings": settings, "results": results}
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(document, indent=2))
    results = sorted(done.values(), key=lambda r: r["nodes"])
    print(table(results))
    return results


if __name__ == "__main__":
    main()
