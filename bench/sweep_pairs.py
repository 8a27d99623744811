"""Sweep points against the point they change one knob of, paired on the same texts.

A knob's effect is the difference between two points, not each point's difference from the
base: every point scores the same validation texts, so the difference is paired per text
(bootstrap interval over texts for the loss; a paired interval and McNemar's exact p for the
accuracy), from the per-text scores the sweep keeps in ``heldout/<point>/heldout.jsonl``.

Run as a script, it pairs any scored runs with reference runs, seed k beside seed k: e.g. a
setting's test-split scores (``bench.heldout_eval``) against another setting's,

    python -m bench.sweep_pairs --runs <out>/<run> ... --against <other-out>/<run> ... \
        --out <file>.json      # the table beside it, <file>.md
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path

from bench.claims_report import last_round, last_scores, pooled
from bench.heldout_eval import results_of
from server_app.evaluation.confidence import interval_cell, paired_ratio_difference

MODELS = ("adapemu", "adapfu")


def _same_texts(scored: Mapping[Path, Mapping[str, Mapping]], models: tuple[str, ...]) -> None:
    """Refuse, naming both files, two runs (folder -> its last round's scores) whose model was
    scored on different texts (per-text token counts or gold labels differ): pairing them
    would compare unrelated texts, or fail deep in the interval code without saying which
    runs."""
    first: dict[str, tuple[Path, tuple]] = {}
    for folder, scores in scored.items():
        for model in models:
            row = scores.get(model)
            if row is None:
                continue
            texts = (row["tokens"], row["gold"])
            seen = first.setdefault(model, (folder, texts))
            if texts != seen[1]:
                raise SystemExit(
                    f"{seen[0] / 'heldout.jsonl'} and {folder / 'heldout.jsonl'}: {model} was "
                    "scored on different texts; score both runs on the same ones"
                )


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
        rows = {mine.parent: last_round(mine), theirs.parent: last_round(theirs)}
        _same_texts(rows, ("base", *MODELS))
        scores, reference_scores = (
            results_of(rows[mine.parent], mine),
            results_of(rows[theirs.parent], theirs),
        )
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


def paired_runs(
    mine: list[Path], theirs: list[Path], models: tuple[str, ...] = MODELS
) -> dict[str, object] | None:
    """Run k of ``mine`` beside run k of ``theirs`` (seeds): per model, the paired loss and
    accuracy differences from each text's scores summed over the runs (the keys of
    :func:`paired_points` without McNemar's p, which needs one outcome per text), plus
    ``seeds``; None when a run lacks a model's scores."""
    _same_texts({folder: last_scores(folder) for folder in mine + theirs}, ("base", *models))
    entry: dict[str, object] = {"seeds": len(mine)}
    for model in models:
        a, b = pooled(mine, model), pooled(theirs, model)
        if a is None or b is None:
            return None
        loss = paired_ratio_difference((a.nll, a.tokens), (b.nll, b.tokens))
        entry.update(loss.keys(f"{model}_loss_vs_reference"))
        if len(a.correct) and len(b.correct):
            accuracy = paired_ratio_difference((a.correct, a.ranked), (b.correct, b.ranked))
            entry.update(accuracy.keys(f"{model}_accuracy_vs_reference"))
    return entry


def paired_groups(
    heldout: Path, against: dict[str, str], groups: dict[str, tuple[str, ...]]
) -> dict[str, dict]:
    """For each seed group of ``against`` (group -> the group it changes one knob of, both
    keys of ``groups``): its reference and :func:`paired_runs`; groups with a seed's scores
    missing on either side are left out."""
    out = {}
    for group, reference in against.items():
        mine = [heldout / name for name in groups[group]]
        theirs = [heldout / name for name in groups[reference]]
        entry = paired_runs(mine, theirs)
        if entry is not None:
            out[group] = {"reference": reference, **entry}
    return out


# The headings of paired_table: what its rows are paired against.
POINTS_HEADING = ("Against the point each changes one knob of (paired per text, same "
                  "validation texts):")  # fmt: skip
GROUPS_HEADING = ("Seed groups against the group each changes one knob of (per-text scores "
                  "summed over the seeds, paired per text):")  # fmt: skip
RUNS_HEADING = ("The runs against their reference runs, run k beside run k (per-text scores "
                "summed over the runs, paired per text):")  # fmt: skip


def paired_table(entries: dict[str, dict], heading: str = POINTS_HEADING) -> str:
    """The paired differences as Markdown under ``heading`` (empty when there are none)."""
    if not entries:
        return ""
    lines = [
        "",
        heading,
        "",
        "| point | against | model | loss − reference | accuracy − reference (pp) | McNemar p |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, entry in entries.items():
        for model in [m for m in MODELS if f"{m}_loss_vs_reference" in entry]:
            p = entry.get(f"{model}_accuracy_vs_reference_p")
            lines.append(
                f"| {name} | {entry['reference']} | {model} "
                f"| {interval_cell(entry, f'{model}_loss_vs_reference', 1, 3)} "
                f"| {interval_cell(entry, f'{model}_accuracy_vs_reference', 100, 1)} "
                f"| {'–' if p is None else f'{p:.2g}'} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Scored runs against reference runs, paired "
                                     "per text, run k beside run k.")  # fmt: skip
    parser.add_argument("--runs", nargs="+", type=Path, required=True,
                        help="folders holding a heldout.jsonl, one per seed")  # fmt: skip
    parser.add_argument("--against", nargs="+", type=Path, required=True,
                        help="the reference's folders, in the same seed order")  # fmt: skip
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--out", type=Path, required=True, help="the JSON; the table beside it")
    given = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(given)
    if len(args.runs) != len(args.against):
        parser.error(f"{len(args.runs)} --runs against {len(args.against)} --against: "
                     "give one reference run per run")  # fmt: skip
    for folder in (*args.runs, *args.against):
        scores = last_scores(folder)
        if not scores:
            parser.error(f"{folder}: no heldout.jsonl with scores")
        missing = [model for model in ("base", *args.models) if model not in scores]
        if missing:
            raise SystemExit(f"{folder / 'heldout.jsonl'}: no scores of {missing}")
    entry = paired_runs(args.runs, args.against, tuple(args.models))
    assert entry is not None  # every folder was checked for every model above
    name, reference = args.runs[0].name, args.against[0].name
    document = {
        "command": " ".join(["python -m bench.sweep_pairs", *given]),
        "runs": [str(folder) for folder in args.runs],
        "against": [str(folder) for folder in args.against],
        "paired": {name: {"reference": reference, **entry}},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2, sort_keys=True))
    report = paired_table(document["paired"], RUNS_HEADING)
    args.out.with_suffix(".md").write_text(report)
    print(report)
    return document


if __name__ == "__main__":
    main()
