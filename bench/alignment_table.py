"""Summarise alignment runs: held-out reward accuracy and margin before and after DPO, paired
on the same held-out preference pairs, with the task loss and ε.

    python -m bench.alignment_table results/align-nodp --json docs/alignment/dpo.json

"Before" is the last SFT round (the SFT-only model), "after" the last round. For AdapEmu and
AdapFu: reward accuracy with its 95 % interval (Wilson) at both, the paired difference
after − before (bootstrap over pairs; McNemar's exact p on the pairs only one of them ranks
right) and the same for the mean reward margin, from the per-pair margins the server keeps in
``preference_heldout.jsonl``. Prints a Markdown table and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.run_files import jsonl_rows, metrics_rows, run_config
from server_app.evaluation.confidence import (
    Interval,
    interval_cell,
    mcnemar,
    paired_ratio_difference,
    ratio,
)
from server_app.preference_eval import accuracy_interval, pair_scores

VARIANTS = ("adapemu", "adapfu")


def _margins_problem(row: Any) -> str | None:
    if not isinstance(row, dict) or type(row.get("round")) is not int:
        return "no integer 'round'"
    if not isinstance(row.get("variant"), str):
        return "no 'variant' name"
    margins = row.get("margins")
    if not isinstance(margins, list) or not all(isinstance(m, (int, float)) for m in margins):
        return "no list of numeric 'margins'"
    return None


def pair_margins(run: Path) -> dict[tuple[int, str], list[float]]:
    """(round, variant) -> the per-pair reward margins in ``run/preference_heldout.jsonl``."""
    path = run / "preference_heldout.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: no such file (a run without DPO, or from before per-pair "
                         "margins were kept)")  # fmt: skip
    rows = jsonl_rows(path, _margins_problem, "a model's per-pair margins")
    return {(row["round"], row["variant"]): row["margins"] for row in rows}


def compare(before: list[float], after: list[float]) -> dict[str, Any]:
    """One model's reward accuracy and mean margin before and after, each with its interval,
    and the paired differences after − before."""
    if len(before) != len(after):
        raise SystemExit(f"{len(before)} held-out pairs before DPO, {len(after)} after")
    ones = [1.0] * len(after)
    accuracy = paired_ratio_difference((pair_scores(after), ones), (pair_scores(before), ones))
    # McNemar's exact test needs two outcomes per pair: a tie counts as not ranked right
    # there, while the accuracies and their difference count it half.
    _, _, p_value = mcnemar([m > 0 for m in after], [m > 0 for m in before])
    margin = paired_ratio_difference((after, ones), (before, ones))
    out: dict[str, Any] = {"pairs": len(after), "accuracy_gain_p": p_value}
    named: dict[str, Interval] = {
        "accuracy_before": accuracy_interval(before),
        "accuracy_after": accuracy_interval(after),
        "accuracy_gain": accuracy,
        "margin_before": ratio(before, ones),
        "margin_after": ratio(after, ones),
        "margin_gain": margin,
    }
    for name, interval in named.items():
        out |= interval.keys(name)
    return out


def summarise(run: Path) -> dict[str, Any]:
    """The numbers of one run folder."""
    keys = ("stage", "dpo-rounds", "num-server-rounds", "dp-clipping-norm", "dp-noise-multiplier")
    config = run_config(run, keys)
    rows = metrics_rows(run)
    last = rows[-1]
    dpo_rounds = config["dpo-rounds"] if config["stage"] in ("auto", "sft+dpo") else 0
    before_round = config["num-server-rounds"] - dpo_rounds
    margins = pair_margins(run)
    task_losses = [
        k for k in last
        if k.startswith("eval_adapfu_") and k.endswith("_loss") and not k.endswith("_pref_loss")
    ]  # fmt: skip
    task_loss = task_losses[0] if task_losses else None
    out: dict[str, Any] = {
        "run": run.name,
        "before_round": before_round,
        "after_round": last["round"],
        "dp_noise_multiplier": config["dp-noise-multiplier"] if config["dp-clipping-norm"] else 0,
        "dp_clipping_norm": config["dp-clipping-norm"],
        "dp_epsilon": last.get("dp_epsilon"),
        "task_loss_adapfu": last.get(task_loss) if task_loss else None,
    }
    for variant in VARIANTS:
        keys = [(before_round, variant), (last["round"], variant)]
        missing = [k for k in keys if k not in margins]
        if variant == "adapemu" and len(missing) == 2:
            continue  # a method without an emulator
        if missing:
            raise SystemExit(
                f"{run / 'preference_heldout.jsonl'}: no margins of {variant} at round "
                f"{missing[0][0]}"
            )
        out[variant] = compare(margins[keys[0]], margins[keys[1]])
    return out


def table(summaries: list[dict[str, Any]]) -> str:
    """The runs as Markdown: a row per model, accuracy in %, margins in reward units."""
    lines = [
        "| run | model | pairs | reward accuracy % before | after | after − before (pp) "
        "| McNemar p | margin before | after | after − before | ε |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for summary in summaries:
        epsilon = summary["dp_epsilon"]
        for variant in VARIANTS:
            if variant not in summary:
                continue
            numbers = summary[variant]
            cells = [
                summary["run"],
                variant,
                str(numbers["pairs"]),
                interval_cell(numbers, "accuracy_before", 100, 1),
                interval_cell(numbers, "accuracy_after", 100, 1),
                interval_cell(numbers, "accuracy_gain", 100, 1),
                f"{numbers['accuracy_gain_p']:.3g}",
                interval_cell(numbers, "margin_before", 1, 4),
                interval_cell(numbers, "margin_after", 1, 4),
                interval_cell(numbers, "margin_gain", 1, 4),
                "–" if epsilon is None else f"{epsilon:.2f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    summaries = [summarise(run) for run in args.runs]
    print(table(summaries), end="")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summaries, indent=2) + "\n")
    return summaries


if __name__ == "__main__":
    main()
