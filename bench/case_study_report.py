"""The case study's report: per-run measures, mean and spread over seeds, the seed's ranking.

Measures, per run (from its run folder):

* accuracy: Banking77 intent accuracy of the global model (AdapFu: the full model with the
  trained LoRA) after the last round, by ranking the 77 labels (``banking77-eval=rank``);
* held-out loss: the gold label's negative log-likelihood per token on the server's
  held-out test texts (``eval-examples``), the same texts for every run;
* traffic per client: bytes up and down over all rounds (Flower's count of the ArrayRecords,
  from ``communication.csv``), averaged over the clients; the one-time model download apart;
* client compute: the clients' measured compute seconds (training; plus, for KD, the soft
  labels on the public set; for split, the client's forward, recomputation and backward)
  per training example;
* server compute: seconds of aggregation, distillation and pre-alignment (FedBiOT), of the
  server's half of every step (split) or of distillation (KD), evaluation excluded.

Rows are compared on their means over the seeds; a difference smaller than the sum of the
two spreads (standard deviations over seeds) is reported as within noise.
"""

from __future__ import annotations

import csv
import json
import statistics
from itertools import pairwise
from pathlib import Path
from typing import Any

from bench.run_files import metrics_rows, run_config
from server_app.report import pyplot

MEASURES = {
    "accuracy": "test accuracy",
    "eval_loss": "held-out loss (nats/token)",
    "bytes_per_client": "traffic per client (up+down)",
    "bytes_up": "up per client",
    "bytes_down": "down per client",
    "bytes_model_download": "model download per client",
    "client_s_per_example": "client compute (s/example)",
    "server_s": "server compute (s, whole run)",
}
MAIN = {
    "fedit-r8": "parameter averaging (FedIT, r=8)",
    "kdfed": "KD-FedLLM",
    "split-q2": "split (half)",
    "fedbiot": "FedBiOT",
}
_SERVER_KEYS = ("time_server_s", "time_aggregate_s", "time_distill_s", "time_prealign_s")


def run_summary(run_dir: Path) -> dict[str, float]:
    """The measures of one finished run."""
    rows = metrics_rows(run_dir)
    config = run_config(run_dir, ("local-steps", "batch-size"))
    per_round = config["local-steps"] * config["batch-size"]
    with open(run_dir / "communication.csv") as f:
        nodes: dict[str, dict[str, float]] = {}
        for line in csv.DictReader(f):
            node = nodes.setdefault(line["node"], dict.fromkeys(("up", "down", "download"), 0))
            node["up"] += int(line["bytes_up"])
            node["down"] += int(line["bytes_down"])
            node["download"] += int(line["bytes_model_download"])
    mean = {k: statistics.fmean(n[k] for n in nodes.values()) for k in ("up", "down", "download")}
    client_s = sum(r.get("client_seconds", r.get("train_seconds")) or 0.0 for r in rows[1:])
    return {
        "accuracy": rows[-1]["eval_adapfu_banking77_accuracy"],
        "eval_loss": rows[-1]["eval_adapfu_banking77_loss"],
        "bytes_up": mean["up"],
        "bytes_down": mean["down"],
        "bytes_per_client": mean["up"] + mean["down"],
        "bytes_model_download": mean["download"],
        "client_s_per_example": client_s / (per_round * (len(rows) - 1)),
        "server_s": sum(r.get(k) or 0.0 for r in rows for k in _SERVER_KEYS),
    }


def aggregate(runs: Path, rows: list[str], seeds: list[int]) -> dict[str, dict[str, Any]]:
    """Per row: every measure's mean, spread (stdev over seeds) and per-seed values."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        done = [s for s in seeds if (runs / f"{row}-s{s}" / "metrics.jsonl").is_file()]
        summaries = [run_summary(runs / f"{row}-s{s}") for s in done]
        if not summaries:
            continue
        out[row] = {"seeds": done}
        for key in MEASURES:
            values = [s[key] for s in summaries]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            out[row][key] = {"mean": statistics.fmean(values), "std": spread, "values": values}
    return out


def _bytes(value: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:,.3g} {unit}"
    return f"{value:,.0f} B"


def _cell(stats: dict[str, Any], key: str) -> str:
    mean, std = stats[key]["mean"], stats[key]["std"]
    if key == "accuracy":
        return f"{100 * mean:.1f} ± {100 * std:.1f} %"
    if key == "eval_loss":
        return f"{mean:.3f} ± {std:.3f}"
    if key.startswith("bytes"):
        return f"{_bytes(mean)} ± {_bytes(std)}"
    if key == "client_s_per_example":
        return f"{1000 * mean:,.3g} ± {1000 * std:,.2g} ms"
    return f"{mean:,.3g} ± {std:,.2g} s"


def table(results: dict[str, dict[str, Any]], rows: dict[str, str]) -> list[str]:
    keys = list(MEASURES)
    lines = [
        "| row | " + " | ".join(MEASURES[k] for k in keys) + " |",
        "| --- |" + " --- |" * len(keys),
    ]
    for row, label in rows.items():
        if row in results:
            cells = " | ".join(_cell(results[row], k) for k in keys)
            lines.append(f"| {label} | {cells} |")
    return lines


def _order(results: dict, key: str, rows: list[str]) -> tuple[list[str], bool]:
    """Rows by decreasing mean, and whether every step exceeds the two rows' spreads."""
    present = sorted((r for r in rows if r in results), key=lambda r: -results[r][key]["mean"])
    clear = all(
        results[a][key]["mean"] - results[b][key]["mean"]
        > results[a][key]["std"] + results[b][key]["std"]
        for a, b in pairwise(present)
    )
    return present, clear


def _claim(results: dict, key: str, rows: list[str], holds: bool) -> str:
    """``a > b > c`` (``≈`` where a step is within the spreads) and the verdict."""
    order, clear = _order(results, key, rows)
    text = MAIN[order[0]]
    for a, b in pairwise(order):
        gap = results[a][key]["mean"] - results[b][key]["mean"]
        text += " > " if gap > results[a][key]["std"] + results[b][key]["std"] else " ≈ "
        text += MAIN[b]
    if not holds:
        if not clear:
            return f"{text}: **not confirmed**, a step lies within the seeds' spread"
        return f"{text}: **disagrees**"
    return f"{text}: **agrees**" + ("" if clear else " on the means, within the seeds' spread")


def ranking(results: dict[str, dict[str, Any]]) -> list[str]:
    """The seed's three claims, checked against our means (parameters = FedIT r=8, split =
    half the blocks, KD = KD-FedLLM)."""
    trio = ["fedit-r8", "split-q2", "kdfed"]
    if not all(r in results for r in trio):
        return ["(the three framework rows are not all present)"]

    def mean(row: str, key: str) -> float:
        return results[row][key]["mean"]

    accuracy = (
        mean("fedit-r8", "accuracy") > mean("split-q2", "accuracy") > mean("kdfed", "accuracy")
    )
    bandwidth = min(trio, key=lambda r: mean(r, "bytes_per_client")) == "kdfed"
    compute = min(trio, key=lambda r: mean(r, "client_s_per_example")) == "split-q2"
    return [
        "- Accuracy (seed: parameters > split > KD). Ours: "
        + _claim(results, "accuracy", trio, accuracy),
        "- Bandwidth (seed: KD lowest for classification). Ours, traffic per client without "
        "the one-time model download: " + _claim(results, "bytes_per_client", trio, bandwidth),
        "- Client compute (seed: split lowest). Ours, seconds per training example: "
        + _claim(results, "client_s_per_example", trio, compute),
    ]


def _bars(
    results: dict, key: str, title: str, path: Path, scale: float = 1.0, log: bool = False
) -> None:
    rows = list(results)
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(8, 3.6))
    means = [results[r][key]["mean"] * scale for r in rows]
    stds = [results[r][key]["std"] * scale for r in rows]
    axes.bar(rows, means, yerr=stds, capsize=4, color="tab:blue", alpha=0.8)
    if log:
        axes.set_yscale("log")
    axes.set_title(title)
    axes.tick_params(axis="x", rotation=30)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _errorbars(
    axes, xs: list[int], results: dict, rows: list[str], key: str, scale: float, label: str
) -> None:
    means = [scale * results[r][key]["mean"] for r in rows]
    stds = [scale * results[r][key]["std"] for r in rows]
    axes.errorbar(xs, means, yerr=stds, fmt="o-", capsize=4, label=label)


def _sweeps(results: dict, blocks: int, path: Path) -> None:
    plt = pyplot()
    figure, panels = plt.subplots(1, 3, figsize=(12, 3.6))
    ranks = sorted((int(r.removeprefix("fedit-r")), r) for r in results if r.startswith("fedit-r"))
    splits = sorted((int(r.removeprefix("split-q")), r) for r in results if r.startswith("split-q"))
    ks = [round(blocks * q / 4) for q, _ in splits]
    split_rows = [r for _, r in splits]
    _errorbars(
        panels[0], [x for x, _ in ranks], results, [r for _, r in ranks], "accuracy", 100, "FedIT"
    )
    panels[0].set(title="Accuracy vs LoRA rank (FedIT)", xlabel="rank", ylabel="accuracy (%)")
    _errorbars(panels[1], ks, results, split_rows, "accuracy", 100, "split")
    panels[1].set(title="Accuracy vs split point", xlabel="client blocks k", ylabel="accuracy (%)")
    _errorbars(
        panels[2], ks, results, split_rows, "client_s_per_example", 1000, "client ms/example"
    )
    _errorbars(panels[2], ks, results, split_rows, "bytes_per_client", 1e-6, "MB per client")
    panels[2].set(title="Split: client cost vs split point", xlabel="client blocks k")
    panels[2].legend(fontsize=7)
    for axes in panels:
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _base_line(base: dict[str, float]) -> list[str]:
    """The untrained model's accuracy, the same starting point for every row."""
    if not base:
        return []
    values = list(base.values())
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return [
        f"Untrained model (every row's start), same test texts: "
        f"{100 * statistics.fmean(values):.1f} ± {100 * spread:.1f} % "
        f"(chance: {100 / 77:.1f} %).",
        "",
    ]


def _study_line(settings: dict[str, Any]) -> list[str]:
    seconds = settings.get("study_wall_seconds")
    if not seconds:
        return []
    return [
        f"Whole study: {seconds / 60:.1f} min, {settings['jobs']} runs at a time, "
        f"{settings['threads_per_run']} torch thread(s) per run."
    ]


def write_report(
    runs: Path,
    out: Path,
    settings: dict[str, Any],
    wall: dict[str, float],
    rows: list[str],
    seeds: list[int],
) -> Path:
    """``out/report.md``, ``out/case_study.json`` and the plots; returns the report's path."""
    results = aggregate(runs, rows, seeds)
    ran = sorted({s for stats in results.values() for s in stats["seeds"]})
    blocks = int(settings["blocks"])
    labels = {
        **MAIN,
        **{f"fedit-r{r}": f"FedIT, r={r}" for r in (4, 16)},
        **{f"split-q{q}": f"split at k={round(blocks * q / 4)}" for q in (1, 3)},
    }
    (out / "case_study.json").write_text(
        json.dumps({"settings": settings, "results": results, "wall_s": wall}, indent=2)
    )
    _bars(results, "accuracy", "Test accuracy (%)", out / "accuracy.png", scale=100)
    _bars(
        results, "bytes_per_client", "Traffic per client, up+down (B)", out / "bytes.png", log=True
    )
    _bars(
        results,
        "client_s_per_example",
        "Client compute (ms per example)",
        out / "client_compute.png",
        scale=1000,
    )
    _sweeps(results, blocks, out / "sweeps.png")
    sweeps = {
        k: labels[k]
        for k in ("fedit-r4", "fedit-r8", "fedit-r16", "split-q1", "split-q2", "split-q3")
    }
    lines = [
        "# Case study: parameter averaging, KD and split learning on Banking77",
        "",
        f"Model `{settings['model']}` ({blocks} blocks), {settings['clients']} clients, "
        f"seeds {', '.join(str(s) for s in ran)}; mean ± standard deviation over seeds.",
        "",
        "Sizes: " + ", ".join(f"`{k}={v}`" for k, v in settings["sizes"].items()),
        "",
        *_base_line(settings.get("base_accuracy", {})),
        "## The table",
        "",
        *table(results, MAIN),
        "",
        "## Sweeps",
        "",
        *table(results, sweeps),
        "",
        "## Against the seed's ranking",
        "",
        *ranking(results),
        "",
        "## Wall time per run (s)",
        "",
        ", ".join(f"{k}: {v:.0f}" for k, v in sorted(wall.items())),
        "",
        *_study_line(settings),
        "",
        "![accuracy](accuracy.png)",
        "",
        "![bytes](bytes.png)",
        "",
        "![client compute](client_compute.png)",
        "",
        "![sweeps](sweeps.png)",
        "",
    ]
    target = out / "report.md"
    target.write_text("\n".join(lines))
    return target
