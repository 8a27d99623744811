"""Sweep points against the point they change one knob of, paired on the same texts.

A knob's effect is the difference between two points, not each point's difference from the
base: every point scores the same validation texts, so the difference is paired per text
(bootstrap interval over texts for the loss; a paired interval and McNemar's exact p for the
accuracy), from the per-text scores the sweep keeps in ``heldout/<point>/heldout.jsonl``.
"""

from __future__ import annotations

from pathlib import Path

from bench.heldout_eval import read_scores
from server_app.evaluation.confidence import interval_cell

MODELS = ("adapemu", "adapfu")


def paired_points(heldout: Path, against: dict[str, str]) -> dict[str, dict]:
    """For each point of ``against`` (point -> the point it changes one knob of, as
    ``bench.fedbiot_sweep.AGAINST``): its reference and, per model, the paired loss and
    accuracy differences (``<model>_loss_vs_reference`` with ``_ci_low``/``_ci_high``,
    ``..._accuracy_vs_reference`` and its McNemar ``_p``); points whose scores or whose
    reference's are missing are left out."""
    out = {}
    for name, reference in against.items():
        mine, theirs = heldout / name / "heldout.jsonl", heldout / reference / "heldout.jsonl"
        if not (mine.is_file() and theirs.is_file()):
            continue
        scores, reference_scores = read_scores(mine), read_scores(theirs)
        entry: dict[str, object] = {"reference": reference}
        for model in MODELS:
            for path, held in ((mine, scores), (theirs, reference_scores)):
                if model not in held:
                    raise SystemExit(f"{path}: no scores of {model}")
            summary = scores[model].summary(reference_scores[model])
            entry.update({f"{model}_{key.replace('vs_base', 'vs_reference')}": value
                          for key, value in summary.items() if "vs_base" in key})  # fmt: skip
        out[name] = entry
    return out


def paired_table(entries: dict[str, dict]) -> str:
    """The paired differences as Markdown (empty when there are none)."""
    if not entries:
        return ""
    lines = [
        "",
        "Against the point each changes one knob of (paired per text, same validation texts):",
        "",
        "| point | against | model | loss − reference | accuracy − reference (pp) | McNemar p |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, entry in entries.items():
        for model in MODELS:
            p = entry.get(f"{model}_accuracy_vs_reference_p")
            lines.append(
                f"| {name} | {entry['reference']} | {model} "
                f"| {interval_cell(entry, f'{model}_loss_vs_reference', 1, 3)} "
                f"| {interval_cell(entry, f'{model}_accuracy_vs_reference', 100, 1)} "
                f"| {'–' if p is None else f'{p:.2g}'} |"
            )
    return "\n".join(lines) + "\n"
