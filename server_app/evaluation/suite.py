"""Which evaluators a run uses, with which settings, and their results as metric keys.

Keys follow ``eval_<variant>_<task>_<metric>`` (variant: ``base``, ``adapemu``, ``adapfu``),
e.g. ``eval_adapfu_gsm8k_accuracy``. ``auto`` evaluates the run's own task when it has a
task metric (GSM8K, Banking77).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from server_app.evaluation import humaneval, tasks
from server_app.evaluation.confidence import wilson
from task_data import USUAL_COLUMNS, Columns


@dataclass(frozen=True)
class EvalSettings:
    """What to evaluate and how much of it."""

    tasks: tuple[str, ...]
    size: int
    seed: int
    max_new_tokens: int = 256
    perplexity_task: str = "gsm8k"
    perplexity_split: str = "train"
    perplexity_columns: Columns = USUAL_COLUMNS
    perplexity_subset: str = ""
    banking77_mode: str = "generate"
    gsm8k_shots: int = 0
    humaneval_samples: int = 1
    humaneval_ks: tuple[int, ...] = (1,)
    data_dir: str | None = None


def evaluate_tasks(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: EvalSettings
) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` for every task of ``settings``."""
    out: dict[str, dict[str, float]] = {}
    common = {"size": settings.size, "seed": settings.seed, "data_dir": settings.data_dir}
    for task in settings.tasks:
        if task == "gsm8k":
            out[task] = tasks.gsm8k(
                model,
                tokenizer,
                shots=settings.gsm8k_shots,
                max_new_tokens=settings.max_new_tokens,
                **common,
            )
        elif task == "banking77":
            out[task] = tasks.banking77(model, tokenizer, mode=settings.banking77_mode, **common)
        elif task == "humaneval":
            out[task] = humaneval.humaneval(
                model,
                tokenizer,
                samples=settings.humaneval_samples,
                ks=settings.humaneval_ks,
                max_new_tokens=settings.max_new_tokens,
                **common,
            )
        else:
            out[task] = tasks.perplexity(
                model,
                tokenizer,
                settings.perplexity_task,
                split=settings.perplexity_split,
                columns=settings.perplexity_columns,
                hub_subset=settings.perplexity_subset,
                **common,
            )
    return out


def with_intervals(metrics: dict[str, float]) -> dict[str, float]:
    """Add a Wilson 95 % interval to an accuracy measured on ``examples`` texts."""
    out = dict(metrics)
    n = int(metrics.get("examples", 0))
    if "accuracy" in metrics and n:
        out.update(wilson(round(metrics["accuracy"] * n), n).keys("accuracy"))
    return out


def metric_keys(variant: str, results: dict[str, dict[str, float]]) -> dict[str, float]:
    """Flatten to ``eval_<variant>_<task>_<metric>`` keys, with intervals."""
    return {
        f"eval_{variant}_{task}_{metric.replace('@', '_at_')}": float(value)
        for task, metrics in results.items()
        for metric, value in with_intervals(metrics).items()
    }
