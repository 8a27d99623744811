"""The FedBiOT sweep's Markdown tables: every point's AdapEmu and AdapFu against the base, and
the seed groups pooled over their seeds (``bench.fedbiot_sweep`` writes them to sweep.md)."""

from __future__ import annotations

from server_app.evaluation.confidence import interval_cell, wilson


def pooled_table(groups: dict[str, dict]) -> str:
    """The seed groups as Markdown (empty when none is complete)."""
    if not groups:
        return ""
    lines = [
        "",
        "Pooled over seeds (per-text scores summed over the seeds; intervals resample texts):",
        "",
        "| setting | seeds | model | loss | loss − base | accuracy % | accuracy − base (pp) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for group, entry in groups.items():
        seeds = len(entry["points"])
        lines.append(f"| {group} | {seeds} | base | {interval_cell(entry, 'base_loss', 1, 3)} "
                     f"| – | {interval_cell(entry, 'base_accuracy', 100, 1)} | – |")  # fmt: skip
        for variant in ("adapemu", "adapfu"):
            if f"{variant}_loss" in entry:
                lines.append(
                    f"| {group} | {seeds} | {variant} "
                    f"| {interval_cell(entry, f'{variant}_loss', 1, 3)} "
                    f"| {interval_cell(entry, f'{variant}_loss_vs_base', 1, 3)} "
                    f"| {interval_cell(entry, f'{variant}_accuracy', 100, 1)} "
                    f"| {interval_cell(entry, f'{variant}_accuracy_vs_base', 100, 1)} |"
                )
    return "\n".join(lines) + "\n"


def base_metrics(points: dict, task: str) -> dict[str, float]:
    """The untrained model's loss (and accuracy where ranked) on the validation texts: a run's
    own base keys where it wrote them, else recovered exactly from AdapFu's value and its
    paired difference (every point scores the same texts); Wilson's interval for the
    accuracy."""
    prefix = f"eval_base_{task}_"
    for point in points.values():
        metrics, key = point["metrics"], f"eval_{{}}_{task}_{{}}"
        if f"{prefix}loss" in metrics:
            return {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}
        if key.format("adapfu", "loss_vs_base") in metrics:
            base = {"loss": metrics[key.format("adapfu", "loss")]
                    - metrics[key.format("adapfu", "loss_vs_base")]}  # fmt: skip
            if key.format("adapfu", "accuracy_vs_base") in metrics:
                accuracy = (metrics[key.format("adapfu", "accuracy")]
                            - metrics[key.format("adapfu", "accuracy_vs_base")])  # fmt: skip
                n = int(metrics[key.format("adapfu", "accuracy_examples")])
                base.update(wilson(round(accuracy * n), n).keys("accuracy"))
            return base
    return {}


def table(points: dict, task: str = "banking77") -> str:
    lines = [
        "| point | model | loss (nats/token) | loss − base | accuracy % | accuracy − base (pp) "
        "| McNemar p | macro-F1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    base = base_metrics(points, task)
    if base:
        lines.append(f"| – | base | {interval_cell(base, 'loss', 1, 3)} | – "
                     f"| {interval_cell(base, 'accuracy', 100, 1)} | – | – | – |")  # fmt: skip
    for name, point in points.items():
        metrics = point["metrics"]
        for variant in ("adapemu", "adapfu"):
            key = f"eval_{variant}_{task}"
            if f"{key}_loss" not in metrics:
                continue
            p = metrics.get(f"{key}_accuracy_vs_base_p")
            lines.append(
                f"| {name} | {variant} | {interval_cell(metrics, f'{key}_loss', 1, 3)} "
                f"| {interval_cell(metrics, f'{key}_loss_vs_base', 1, 3)} "
                f"| {interval_cell(metrics, f'{key}_accuracy', 100, 1)} "
                f"| {interval_cell(metrics, f'{key}_accuracy_vs_base', 100, 1)} "
                f"| {'–' if p is None else f'{p:.2g}'} "
                f"| {interval_cell(metrics, f'{key}_macro_f1', 1, 3)} |"
            )
    return "\n".join(lines) + "\n"
