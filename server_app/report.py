"""Turn one or more run folders into a Markdown report with tables and PNG plots.

    python -m server_app.report results/fedbiot results/fedit --out reports/compare

Writes ``report.md`` with the final metrics of every run and model variant, communication
totals, and plots (losses per round, task metrics per round, bytes per round), every run on
the same axes so that methods compare at a glance.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any

LOSS_KEYS = ("train_loss", "distill_loss", "client_eval_loss")
# Sample sizes, not results: left out of the metrics table.
_COUNT_SUFFIXES = ("_examples", "_problems", "_tokens")


def pyplot() -> ModuleType:
    """matplotlib's pyplot on the file-only backend; matplotlib is an extra (``report``), so
    a clear error says how to install it where it is missing."""
    try:
        import matplotlib
    except ImportError:
        raise ModuleNotFoundError(
            "the report's plots need matplotlib, which is not installed: "
            'pip install ".[report]" (or pip install matplotlib)'
        ) from None
    matplotlib.use("Agg")  # files only: no display on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def load_run(run_dir: Path) -> dict[str, Any]:
    """``config.json`` and the rows of ``metrics.jsonl``; a clear error when either is bad."""
    config_path, metrics_path = run_dir / "config.json", run_dir / "metrics.jsonl"
    for path in (config_path, metrics_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: is {run_dir} a run folder?")
    rows = []
    for number, line in enumerate(metrics_path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{metrics_path} line {number}: {error}") from None
    if not rows:
        raise ValueError(f"{metrics_path} has no rounds")
    config = json.loads(config_path.read_text())
    run_config = config.get("run_config", {})
    label = f"{run_dir.name} ({run_config.get('method', '?')}/{run_config.get('algorithm', '?')})"
    return {"dir": run_dir, "label": label, "config": config, "rows": rows}


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _last(rows: list[dict], key: str) -> float | None:
    for row in reversed(rows):
        value = _number(row.get(key))
        if value is not None:
            return value
    return None


def _format(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def final_metrics_table(runs: list[dict]) -> list[str]:
    """One row per run and evaluation key (``eval_<variant>_<task>_<metric>``), last value."""
    keys = sorted(
        k
        for k in {k for run in runs for row in run["rows"] for k in row}
        if k.startswith("eval_") and "_client" not in k and not k.endswith(_COUNT_SUFFIXES)
    )
    lines = ["| run | variant | metric | first | final |", "| --- | --- | --- | --- | --- |"]
    for run in runs:
        for key in keys:
            final = _last(run["rows"], key)
            if final is None:
                continue
            first = next(
                (_number(r.get(key)) for r in run["rows"] if _number(r.get(key)) is not None),
                None,
            )
            variant, _, metric = key.removeprefix("eval_").partition("_")
            lines.append(
                f"| {run['label']} | {variant} | {metric} | {_format(first)} | {_format(final)} |"
            )
    return lines


def communication_table(runs: list[dict]) -> list[str]:
    """Totals over the run: bytes up, down and the one-time model download; wall time."""
    lines = [
        "| run | rounds | bytes up | bytes down | model download | wall time (s) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for run in runs:
        rows = run["rows"]
        total = {k: sum(_number(r.get(k)) or 0 for r in rows) for k in ("bytes_up", "bytes_down")}
        download = sum(_number(r.get("bytes_model_download")) or 0 for r in rows)
        lines.append(
            f"| {run['label']} | {max(r['round'] for r in rows)} | {total['bytes_up']:,.0f} | "
            f"{total['bytes_down']:,.0f} | {download:,.0f} | {_format(_last(rows, 'elapsed_s'))} |"
        )
    return lines


def _plot(
    plt: ModuleType, runs: list[dict], keys: list[str], title: str, ylabel: str, path: Path
) -> bool:
    """One line per run and key; False (no file) when no run has any of the keys."""
    figure, axes = plt.subplots(figsize=(7, 4))
    drawn = False
    for run in runs:
        for key in keys:
            points = [(r["round"], _number(r.get(key))) for r in run["rows"]]
            points = [(x, y) for x, y in points if y is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                axes.plot(xs, ys, marker="o", label=f"{run['label']}: {key}")
                drawn = True
    if drawn:
        axes.set_title(title)
        axes.set_xlabel("round")
        axes.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
        figure.tight_layout()
        figure.savefig(path, dpi=110)
    plt.close(figure)
    return drawn


def write_report(run_dirs: list[Path], out: Path) -> Path:
    """Write ``out/report.md`` and its plots; return the Markdown file's path."""
    plt = pyplot()  # before any work: a missing matplotlib is said at once
    runs = [load_run(Path(d)) for d in run_dirs]
    out.mkdir(parents=True, exist_ok=True)
    keys = {k for run in runs for row in run["rows"] for k in row}
    eval_losses = sorted(k for k in keys if k.startswith("eval_") and k.endswith("_loss"))
    task_metrics = sorted(
        k for k in keys if k.startswith("eval_") and k.endswith(("_accuracy", "_macro_f1"))
    )
    plots = {
        "losses.png": (list(LOSS_KEYS) + eval_losses, "Losses per round", "loss"),
        "accuracy.png": (task_metrics, "Task metrics per round", "score"),
        "bytes.png": (["bytes_up", "bytes_down"], "Bytes per round", "bytes"),
    }
    lines = ["# Federated fine-tuning report", ""]
    lines += ["Runs: " + ", ".join(f"`{run['dir']}`" for run in runs), ""]
    lines += ["## Final metrics", "", *final_metrics_table(runs), ""]
    lines += ["## Communication", "", *communication_table(runs), ""]
    lines += ["## Plots", ""]
    for name, (plot_keys, title, ylabel) in plots.items():
        if _plot(plt, runs, plot_keys, title, ylabel, out / name):
            lines += [f"![{title}]({name})", ""]
    target = out / "report.md"
    target.write_text("\n".join(lines))
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="results/<run> folders")
    parser.add_argument("--out", type=Path, default=Path("reports/latest"))
    args = parser.parse_args(argv)
    try:
        print(f"wrote {write_report(args.runs, args.out)}")
    except ModuleNotFoundError as error:
        parser.exit(2, f"server_app.report: {error}\n")


if __name__ == "__main__":
    main()
