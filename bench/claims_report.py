"""bench.fedbiot_claims' analysis: per-text scores pooled over seeds, the table, the verdicts.

Each run's ``heldout.jsonl`` holds, for its last round, every model's per-text response NLL,
token count and (for ranked texts) predicted and gold label. Every run scores the same texts,
so a text's scores are summed over seeds, and each interval is a bootstrap over texts of
those sums: the seeds' training noise and the texts' sampling both show in it, and two methods
are compared text by text (paired) on the same seeds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType

import numpy as np

from bench.run_files import jsonl_rows, metrics_rows, run_config
from server_app.evaluation.confidence import (
    Interval,
    interval_cell,
    paired_ratio_difference,
    ratio,
)


@dataclass(frozen=True)
class Pooled:
    """One model's per-text sums over seeds: NLL and tokens (every text), correct rankings
    and rankings (the ranked texts)."""

    nll: np.ndarray
    tokens: np.ndarray
    correct: np.ndarray
    ranked: np.ndarray


SCORE_KEYS = ("round", "variant", "nll", "tokens", "predicted", "gold")


def _row_problem(row: object) -> str | None:
    """What makes ``row`` not one model's per-text scores, or None."""
    if not isinstance(row, dict):
        return "not a JSON object"
    missing = [key for key in SCORE_KEYS if key not in row]
    if missing:
        return f"no {missing}"
    if not isinstance(row["round"], int) or not isinstance(row["variant"], str):
        return "round must be an integer and variant a string"
    if not all(isinstance(row[key], list) for key in SCORE_KEYS[2:]):
        return "nll, tokens, predicted and gold must be lists"
    numbers = row["nll"] + row["tokens"]
    if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in numbers):
        return "nll and tokens must hold numbers"
    if len(row["nll"]) != len(row["tokens"]) or len(row["predicted"]) != len(row["gold"]):
        return "nll and tokens, and predicted and gold, must have one entry per text"
    if len(row["gold"]) > len(row["nll"]):
        return "more ranked texts than scored ones"
    return None


def read_rows(path: Path) -> list[dict]:
    """Every row of a ``heldout.jsonl`` (the server's in-run scores or bench.heldout_eval's);
    a bad line is refused naming the file and the line, since these files are read back
    from run folders that anything may have written."""
    return jsonl_rows(path, _row_problem, "a scored model")


def last_round(path: Path) -> dict[str, dict]:
    """Variant -> per-text scores of the last round in the ``heldout.jsonl`` at ``path``."""
    rows = read_rows(path)
    last = max((r["round"] for r in rows), default=None)
    return {r["variant"]: r for r in rows if r["round"] == last}


def last_scores(run_dir: Path) -> Mapping[str, Mapping]:
    """Variant -> per-text scores of the run's last evaluated round (none without a
    ``heldout.jsonl``)."""
    path = run_dir / "heldout.jsonl"
    if not path.is_file():
        return {}
    stat = path.stat()
    return _last_round(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=256)
def _last_round(path: str, mtime_ns: int, size: int) -> Mapping[str, Mapping]:
    """Parsed once per file version (path, mtime, size): a report reads each run's file
    once per model and claim. Read-only views, since every caller shares the cached one."""
    rows = last_round(Path(path))
    return MappingProxyType(
        {
            variant: MappingProxyType({k: tuple(v) if isinstance(v, list) else v
                                       for k, v in row.items()})
            for variant, row in rows.items()
        }
    )  # fmt: skip


def _variant(scores: Mapping[str, Mapping], model: str) -> dict | None:
    """A model's per-text NLL, tokens, correct rankings and rankings; ``local``: the client
    models' scores summed per text (a token-weighted mean loss and a mean accuracy over the
    clients' models)."""
    if model == "local":
        parts = [v for k, v in scores.items() if k.startswith("client")]
    else:
        parts = [scores[model]] if model in scores else []
    if not parts:
        return None
    return {
        "nll": np.sum([p["nll"] for p in parts], axis=0),
        "tokens": np.sum([p["tokens"] for p in parts], axis=0),
        "correct": np.sum([np.equal(p["predicted"], p["gold"]) for p in parts], axis=0),
        "ranked": np.sum([np.ones(len(p["predicted"])) for p in parts], axis=0),
    }


def pooled(run_dirs: list[Path], model: str) -> Pooled | None:
    """``model``'s scores summed over the runs (seeds); None unless every run has them."""
    parts = [_variant(last_scores(d), model) for d in run_dirs]
    if not parts or any(p is None for p in parts):
        return None
    ranked = all(len(p["ranked"]) for p in parts)
    return Pooled(
        **{key: np.sum([p[key] for p in parts], axis=0) for key in ("nll", "tokens")},
        correct=np.sum([p["correct"] for p in parts], axis=0) if ranked else np.array([]),
        ranked=np.sum([p["ranked"] for p in parts], axis=0) if ranked else np.array([]),
    )


def pooled_against_base(run_dirs: list[Path], variants: list[str]) -> dict[str, dict] | None:
    """Per model (``base`` and each of ``variants`` every run has): loss and accuracy pooled
    per text over the runs, each with a bootstrap interval over texts, and for the variants
    the paired differences against the base scored in the same runs (keys ``loss``,
    ``loss_vs_base``, ``accuracy``, ``accuracy_vs_base`` with ``_ci_low``/``_ci_high``, and
    the texts behind them, ``loss_examples`` and ``accuracy_examples``); None unless every
    run has the base's scores."""
    base = pooled(run_dirs, "base")
    if base is None:
        return None
    out = {"base": {**ratio(base.nll, base.tokens).keys("loss"),
                    **ratio(base.correct, base.ranked).keys("accuracy"),
                    **_text_counts(base)}}  # fmt: skip
    for variant in variants:
        scores = pooled(run_dirs, variant)
        if scores is None:
            continue
        loss, correct = (scores.nll, scores.tokens), (scores.correct, scores.ranked)
        out[variant] = {
            **ratio(*loss).keys("loss"),
            **paired_ratio_difference(loss, (base.nll, base.tokens)).keys("loss_vs_base"),
            **ratio(*correct).keys("accuracy"),
            **paired_ratio_difference(correct, (base.correct, base.ranked)).keys(
                "accuracy_vs_base"
            ),
            **_text_counts(scores),
        }
    return out


def _text_counts(scores: Pooled) -> dict[str, int]:
    return {"loss_examples": len(scores.nll), "accuracy_examples": len(scores.correct)}


def models_of(row: str) -> tuple[str, ...]:
    if row.startswith("fedbiot") or row in ("fedot", "offsite"):
        return ("adapemu", "adapfu")
    return ("local",) if row == "local" else ("adapfu",)


COSTS = (
    "client_seconds_per_example", "bytes_per_client", "server_seconds", "eval_seconds",
    "wall_seconds",
)  # fmt: skip


def _eval_seconds(run_dir: Path, rows: list[dict]) -> float:
    """The server's evaluation seconds over a run's rounds (held-out scores, fidelity); a
    value that is not a finite number of seconds is refused naming the file and round."""
    total = 0.0
    for row in rows:
        value = row.get("time_eval_s")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < np.inf:
            raise SystemExit(
                f"{run_dir / 'metrics.jsonl'}: round {row['round']}: time_eval_s is "
                f"{value!r}, not a number of seconds"
            )
        total += value
    return total


def _costs(run_dirs: list[Path], wall: dict[str, float], clients: int) -> dict[str, float]:
    """Means over the runs: client train seconds per example, bytes per client (both ways,
    the model download included), server compute seconds (pre-alignment, aggregation,
    distillation; KD's distillation and split learning's server half: ``time_server_s``),
    the server's evaluation seconds, wall seconds."""
    per_example, per_client, server, evaluation = [], [], [], []
    for run_dir in run_dirs:
        config = run_config(run_dir, ("local-steps", "batch-size"))
        rows = metrics_rows(run_dir)
        evaluation.append(_eval_seconds(run_dir, rows))
        trained = [r for r in rows if r["round"] > 0]
        examples = int(config["local-steps"]) * int(config["batch-size"])
        # Split learning's clients report their share of each step as client_seconds.
        seconds = [r.get("train_seconds", r.get("client_seconds", np.nan)) for r in trained]
        per_example.append(np.mean(seconds) / examples)
        moved = sum(
            r.get("bytes_up", 0) + r.get("bytes_down", 0) + r.get("bytes_model_download", 0)
            for r in trained
        )
        per_client.append(moved / max(1, min(clients, int(trained[0]["clients_sampled"]))))
        server.append(
            rows[0].get("time_prealign_s", 0.0)
            + sum(
                r.get(k, 0.0)
                for r in trained
                for k in ("time_distill_s", "time_aggregate_s", "time_server_s")
            )
        )
    return {
        "client_seconds_per_example": float(np.mean(per_example)),
        "bytes_per_client": float(np.mean(per_client)),
        "server_seconds": float(np.mean(server)),
        "eval_seconds": float(np.mean(evaluation)),
        "wall_seconds": float(np.mean([wall.get(d.name, np.nan) for d in run_dirs])),
    }


def run_budget(cells: dict[tuple[str, str], list[Path]], wall: dict[str, float]) -> dict:
    """What the report's runs cost, each run once (the single-client rows serve every
    partition): their number, wall seconds summed and the server's evaluation seconds
    summed, so that the report shows how much of the grid's time the evaluation takes."""
    runs = sorted({d for dirs in cells.values() for d in dirs})
    walls = [wall.get(d.name, np.nan) for d in runs]
    evaluation = sum(_eval_seconds(d, metrics_rows(d)) for d in runs)
    return {"runs": len(runs), "wall_seconds": float(np.sum(walls)),
            "eval_seconds": evaluation}  # fmt: skip


def model_table(
    cells: dict[tuple[str, str], list[Path]], wall: dict[str, float], clients: int
) -> list[dict]:
    """One row per (method, partition, model) with every seed finished."""
    table = []
    base = next((b for d in cells.values() if (b := pooled(d, "base")) is not None), None)
    if base is not None:
        # Every run scores the same texts with the same untrained model: one row, no costs.
        table.append({"method": "base", "partition": "–", "model": "base",
                      "texts": len(base.nll), "ranked_texts": len(base.correct),
                      **ratio(base.nll, base.tokens).keys("loss"),
                      **ratio(base.correct, base.ranked).keys("accuracy"),
                      **dict.fromkeys(COSTS, float("nan"))})  # fmt: skip
    for (row, partition), run_dirs in cells.items():
        for model in models_of(row):
            scores = pooled(run_dirs, model)
            if scores is None:
                continue
            entry = {"method": row, "partition": partition, "model": model,
                     "seeds": len(run_dirs), "texts": len(scores.nll),
                     "ranked_texts": len(scores.correct),
                     **ratio(scores.nll, scores.tokens).keys("loss")}  # fmt: skip
            if len(scores.correct):
                entry.update(ratio(scores.correct, scores.ranked).keys("accuracy"))
            table.append({**entry, **_costs(run_dirs, wall, clients)})
    return table


# (claim, method a, model a, method b, model b): "a is better than b"; "base" is the untrained
# model as scored in method b's own runs.
CLAIMS = (
    ("FedBiOT AdapFu > base (beta 0.2)", "fedbiot-b0.2", "adapfu", "fedbiot-b0.2", "base"),
    ("FedIT AdapFu > base", "fedit", "adapfu", "fedit", "base"),
    ("AdapFu > AdapEmu (FedBiOT beta 0.2)", "fedbiot-b0.2", "adapfu", "fedbiot-b0.2", "adapemu"),
    ("AdapFu > AdapEmu (FedBiOT beta 0.5)", "fedbiot-b0.5", "adapfu", "fedbiot-b0.5", "adapemu"),
    ("AdapFu > AdapEmu (offsite-tuning)", "offsite", "adapfu", "offsite", "adapemu"),
    ("FedBiOT AdapFu >= FedOT AdapFu", "fedbiot-b0.2", "adapfu", "fedot", "adapfu"),
    ("FedBiOT AdapFu >= offsite-tuning AdapFu", "fedbiot-b0.2", "adapfu", "offsite", "adapfu"),
    ("federated (FedIT) > local-only", "fedit", "adapfu", "local", "local"),
    ("parameter averaging (FedIT) > split learning", "fedit", "adapfu", "split", "adapfu"),
    ("split learning > KD-FedLLM", "split", "adapfu", "kdfed", "adapfu"),
    ("KD-FedLLM AdapFu > base", "kdfed", "adapfu", "kdfed", "base"),
)


def verdict(difference: Interval, higher_is_better: bool) -> str:
    """``agrees`` when the interval of (a - b) lies on a's better side, ``disagrees`` when on
    b's, ``cannot tell`` when it holds zero."""
    low, high = (difference.low, difference.high) if higher_is_better else (
        -difference.high, -difference.low)  # fmt: skip
    if not np.isfinite(low):
        return "cannot tell"
    return "agrees" if low > 0 else "disagrees" if high < 0 else "cannot tell"


def claims(cells: dict[tuple[str, str], list[Path]], partitions: list[str]) -> list[dict]:
    """Every claim per partition: paired differences (a - b) of loss and accuracy with 95 %
    intervals over texts, and the verdict on each."""
    out = []
    for partition in partitions:
        for claim, row_a, model_a, row_b, model_b in CLAIMS:
            dirs_a, dirs_b = cells.get((row_a, partition)), cells.get((row_b, partition))
            a = pooled(dirs_a, model_a) if dirs_a else None
            b = pooled(dirs_b, model_b) if dirs_b else None
            entry: dict[str, object] = {"claim": claim, "partition": partition}
            if a is None or b is None:
                out.append({**entry, "verdict": "not run"})
                continue
            loss = paired_ratio_difference((a.nll, a.tokens), (b.nll, b.tokens))
            entry.update(loss.keys("loss_difference"))
            entry["verdict_loss"] = verdict(loss, higher_is_better=False)
            if len(a.correct) and len(b.correct):
                accuracy = paired_ratio_difference((a.correct, a.ranked), (b.correct, b.ranked))
                entry.update(accuracy.keys("accuracy_difference"))
                entry["verdict_accuracy"] = verdict(accuracy, higher_is_better=True)
            out.append(entry)
    return out


def _number(value: float, digits: int) -> str:
    return f"{value:.{digits}f}" if np.isfinite(value) else "–"


def write_report(document: dict, path: Path) -> Path:
    """The table and the verdicts as Markdown."""
    lines = [
        f"# The seeds' claims on {document['model']} and Banking77",
        "",
        f"Command: `{document['command']}`; seeds {document['seeds']}, "
        f"{document['clients']} clients; settings in claims.json. Loss: gold-label NLL per "
        "token (nats); accuracy: exact ranking over the 77 labels; 95 % intervals "
        "bootstrap texts, per-text scores summed over seeds.",
        "",
        "![every model with its intervals](claims.png)",
        "",
        "| method | partition | model | loss | accuracy % | client s/example "
        "| MB per client | server s | eval s | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in document["table"]:
        lines.append(
            f"| {e['method']} | {e['partition']} | {e['model']} | {interval_cell(e, 'loss')} "
            f"| {interval_cell(e, 'accuracy', 100, 1)} "
            f"| {_number(e['client_seconds_per_example'], 3)} "
            f"| {_number(e['bytes_per_client'] / 1e6, 1)} | {_number(e['server_seconds'], 0)} "
            f"| {_number(e['eval_seconds'], 0)} | {_number(e['wall_seconds'], 0)} |"
        )
    if budget := document.get("budget"):
        wall, evaluation = budget["wall_seconds"], budget["eval_seconds"]
        share = 100 * evaluation / wall if wall > 0 else np.nan
        lines += [
            "",
            f"Cost: {budget['runs']} runs, {_number(wall, 0)} wall seconds summed "
            f"over the runs ({_number(wall / 3600, 1)} h), of which the server's "
            f"evaluation {_number(evaluation, 0)} s ({_number(share, 0)} %).",
        ]
    lines += ["", "| claim | partition | loss a − b | verdict | accuracy a − b (pp) | verdict |",
              "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for c in document["claims"]:
        lines.append(
            f"| {c['claim']} | {c['partition']} | {interval_cell(c, 'loss_difference')} "
            f"| {c.get('verdict_loss', c.get('verdict', '–'))} "
            f"| {interval_cell(c, 'accuracy_difference', 100, 1)} "
            f"| {c.get('verdict_accuracy', c.get('verdict', '–'))} |"
        )
    path.write_text("\n".join(lines) + "\n")
    return path
