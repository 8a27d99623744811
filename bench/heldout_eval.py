"""Finished runs' delivered models scored again on another held-out set, paired with the base.

A sweep picks its settings on a validation part of the training split; its final models are
then scored once on the test split, the texts no choice was made on. Each run's exported
models (``adapfu/``, optionally ``adapemu/``) and the untrained model are scored on the same
texts of ``--split``, chosen exactly as the server chooses them (``eval-examples`` texts by
``heldout_test_indices``, the first ``--ranked`` of them ranked over the 77 Banking77 labels),
so the scores pair with the claims bench's, which evaluates on the same test texts:

    python -m bench.heldout_eval --runs results/fedbiot-sweep/runs/b0.2-p100-a8-lr3e-3-s40 \\
        results/fedbiot-sweep/runs/b0.2-p100-a8-lr3e-3-s40-seed{1,2} \\
        --out docs/fedbiot-recipe/test-split
    python -m bench.heldout_eval --runs /tmp/sweep/runs/b0.5-p20 --examples 6 --ranked 4 \\
        --out /tmp/test-split                                  # a tiny-model sweep's run

Per run, ``<out>/<run>/heldout.jsonl`` holds every text's scores (variants ``base``,
``adapfu``, ...); ``<out>/heldout_eval.json`` each model's loss and accuracy with 95 %
intervals, paired differences against the base and McNemar's p, and the same pooled per text
over the runs (seeds; ``bench.claims_report.pooled``); ``<out>/heldout_eval.md`` the table.
A run already scored in ``<out>`` is not scored again.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("FEDBIOT_CACHE", str(REPO / ".cache" / "fedbiot"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.claims_report import last_round, pooled_against_base  # noqa: E402
from federation.run_config import ConfigError, RunConfig  # noqa: E402
from models.loading import load_model  # noqa: E402
from server_app.evaluation.confidence import interval_cell  # noqa: E402
from server_app.evaluation.heldout import HeldoutResult, score_records  # noqa: E402
from server_app.server_eval import heldout_records  # noqa: E402
from task_data.sources import default_data_dir  # noqa: E402


def run_settings(run_dir: Path, args: argparse.Namespace) -> RunConfig:
    """The run's own config (model, task, sequence length) with the held-out set asked for
    here, read from ``--data-dir`` (the run's own data folder may be gone with its
    worktree)."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise SystemExit(f"{run_dir}: no config.json, not a finished run folder")
    try:
        run_config = json.loads(path.read_text())["run_config"]
        run_config.update(
            {"eval-split": args.split, "eval-examples": args.examples,
             "data-dir": str(args.data_dir)}
        )  # fmt: skip
        return RunConfig.from_flower(run_config)
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise SystemExit(f"{path}: not a run's config.json ({error!r})") from None
    except ConfigError as error:
        raise SystemExit(f"{path}: {error}") from None


def score(model_dir: str, config: RunConfig, args: argparse.Namespace, what: str) -> HeldoutResult:
    model, tokenizer = load_model(model_dir)
    root = Path(config.data_dir) if config.data_dir else default_data_dir()
    labels = json.loads((root / "banking77" / "categories.json").read_text())
    records = heldout_records(config)
    return score_records(model, tokenizer, records, config.seq_length, config.batch_size,
                         labels=labels, ranked=min(args.ranked, len(records)),
                         description=what)  # fmt: skip


def _single_thread() -> None:
    """A worker process of ``--workers``: one thread each, so N workers use N cores."""
    import torch

    torch.set_num_threads(1)


class _Deferred:
    """A model scored when its result is first asked for: with one worker, runs are then
    scored and written one after the other, as the pool's futures are."""

    def __init__(self, *job: object) -> None:
        self._job: tuple | None = job
        self._value: HeldoutResult | None = None

    def result(self) -> HeldoutResult:
        if self._job is not None:
            self._value, self._job = score(*self._job), None
        assert self._value is not None
        return self._value


@contextlib.contextmanager
def _scorer(workers: int) -> Iterator[Callable[..., Future | _Deferred]]:
    """``submit(model_dir, config, args, what)``: in ``workers`` spawned single-thread
    processes when more than one (the 77-way ranking costs about a second per text, so the
    whole test split is an hour per model, and models are independent), else deferred in this
    process. A failure cancels the models not yet started."""
    if workers == 1:
        yield _Deferred
        return
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_single_thread)
    try:
        yield functools.partial(pool.submit, score)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def scored_runs(args: argparse.Namespace) -> list[Path]:
    """Score every run not yet scored in ``--out``, writing each run's scores as soon as its
    models are scored; returns the runs' score folders."""
    settings = {run_dir: run_settings(run_dir, args) for run_dir in args.runs}
    shared = {(c.model, c.task, c.seq_length): d for d, c in settings.items()}
    if len(shared) > 1:
        raise SystemExit(
            "runs differ in model, task or seq-length: "
            + ", ".join(str(d) for d in shared.values())
        )
    pending = [d for d in args.runs if not (args.out / d.name / "heldout.jsonl").is_file()]
    for run_dir in pending:
        if settings[run_dir].task != "banking77":
            raise SystemExit(
                f"{run_dir}: task={settings[run_dir].task!r}; only banking77 runs are ranked"
            )
        for variant in args.variants:
            if not (run_dir / variant / "config.json").is_file():
                raise SystemExit(f"{run_dir}: no exported {variant}/ model")
    if not pending:
        return [args.out / d.name for d in args.runs]
    with _scorer(args.workers) as submit:
        # The base is scored once, first (its ranking is the slowest: no trained label
        # prior prunes its trie): every run must score the same texts with the same model.
        base = submit(settings[pending[0]].model, settings[pending[0]], args, "base")
        futures = {}
        for run_dir in pending:
            futures[run_dir] = {
                v: submit(str(run_dir / v), settings[run_dir], args, v) for v in args.variants
            }
        for run_dir, variants in futures.items():
            scores = {"base": base.result(), **{v: f.result() for v, f in variants.items()}}
            folder = args.out / run_dir.name
            folder.mkdir(parents=True, exist_ok=True)
            rows = [{"round": 0, "variant": v, "task": "banking77", **r.to_json()}
                    for v, r in scores.items()]  # fmt: skip
            (folder / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return [args.out / d.name for d in args.runs]


def read_scores(path: Path) -> dict[str, HeldoutResult]:
    """Every model's per-text scores of the last round in a ``heldout.jsonl``; a bad line is
    refused naming the file and the line (``bench.claims_report.last_round``)."""
    return results_of(last_round(path), path)


def results_of(rows: dict[str, dict], path: Path) -> dict[str, HeldoutResult]:
    """Variant -> scores, from the last round's rows read from ``path`` (named when it has
    no base model's)."""
    results = {
        variant: HeldoutResult(row["nll"], row["tokens"], row["predicted"], row["gold"])
        for variant, row in rows.items()
    }
    if "base" not in results:
        raise SystemExit(f"{path}: no base model's scores")
    return results


def summarise(folders: list[Path], variants: list[str]) -> dict:
    """Per run: every model's summary against the base; pooled over the runs the same."""
    per_run = {}
    for folder in folders:
        results = read_scores(folder / "heldout.jsonl")
        base = results["base"]
        missing = [v for v in variants if v not in results]
        if missing:
            raise SystemExit(f"{folder / 'heldout.jsonl'}: no scores of {missing}; score again")
        per_run[folder.name] = {
            v: results[v].summary(None if v == "base" else base) for v in ("base", *variants)
        }
    together = pooled_against_base(folders, variants) if len(folders) > 1 else None
    return {"runs": per_run, "pooled": together or {}}


def table(summary: dict) -> str:
    lines = [
        "| run | model | texts (loss/ranked) | loss | loss − base | accuracy % "
        "| accuracy − base (pp) | McNemar p |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups = [*summary["runs"].items()]
    if summary["pooled"]:
        groups.append((f"pooled over {len(summary['runs'])} runs", summary["pooled"]))
    for name, models in groups:
        for variant, m in models.items():
            texts = f"{int(m.get('loss_examples', 0))}/{int(m.get('accuracy_examples', 0))}"
            p = m.get("accuracy_vs_base_p")
            differences = (
                ("–", "–")
                if variant == "base"
                else (interval_cell(m, "loss_vs_base", 1, 3),
                      interval_cell(m, "accuracy_vs_base", 100, 1))
            )  # fmt: skip
            lines.append(
                f"| {name} | {variant} | {texts if 'loss_examples' in m else '–'} "
                f"| {interval_cell(m, 'loss', 1, 3)} | {differences[0]} "
                f"| {interval_cell(m, 'accuracy', 100, 1)} | {differences[1]} "
                f"| {'–' if p is None else f'{p:.2g}'} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="run folders")
    parser.add_argument("--split", choices=("test", "validation"), default="test")
    parser.add_argument("--examples", type=int, default=1000,
                        help="texts for the loss (all when the split has fewer)")  # fmt: skip
    parser.add_argument("--ranked", type=int, default=300, help="texts ranked over the labels")
    parser.add_argument("--variants", nargs="+", default=["adapfu"], choices=("adapfu", "adapemu"))
    parser.add_argument("--data-dir", type=Path, default=REPO / "data")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=1,
                        help="models scored at once, one process and one thread each")  # fmt: skip
    args = parser.parse_args(argv)
    for option, value, least in (("--workers", args.workers, 1), ("--examples", args.examples, 1),
                                 ("--ranked", args.ranked, 0)):  # fmt: skip
        if value < least:
            parser.error(f"{option}={value}: must be at least {least}")
    folders = scored_runs(args)
    summary = summarise(folders, args.variants)
    document = {
        "command": " ".join(["python -m bench.heldout_eval", *(sys.argv[1:] if argv is None
                                                                  else argv)]),
        "split": args.split,
        "examples": args.examples,
        "ranked": args.ranked,
        **summary,
    }  # fmt: skip
    (args.out / "heldout_eval.json").write_text(json.dumps(document, indent=2, sort_keys=True))
    report = table(summary)
    (args.out / "heldout_eval.md").write_text(report)
    print(report)
    return document


if __name__ == "__main__":
    main()
