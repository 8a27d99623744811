"""The values run-config keys may take, which ``RunConfig.validate`` checks against.

Also the evaluation tasks the server can score: ``eval-tasks`` is validated when the config
is parsed, on clients too, so the names live here rather than in ``server_app/evaluation``.
"""

from __future__ import annotations

METHODS = (
    "fedbiot",
    "fedit",
    "fedot",
    "offsite",
    "local",
    "central",
    "fedbialign",
    "kdfed",
    "split",
)
SPLIT_DTYPES = ("fp32", "fp16", "bf16-as-fp16")
ALGORITHMS = (
    "fedavg",
    "fedprox",
    "fedavgm",
    "scaffold",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedmedian",
    "fedtrimmedavg",
    "krum",
)
PARTITIONERS = ("iid", "dirichlet", "natural")
LR_SCHEDULERS = ("constant", "cosine")
# The distillation's hidden-state term: relative to the teacher's norm, or the raw squared
# error per token (the paper's Eq. 3; models/distillation.py says why relative is default).
DISTILL_HIDDEN_NORMS = ("relative", "raw")
STAGES = ("auto", "sft", "dpo", "sft+dpo")
DPO_REFERENCES = ("round", "fixed")
# Where the server also logs each metrics.jsonl row (server_app/tracking.py).
REPORT_TO = ("none", "tensorboard", "wandb")

# Where the server's held-out texts come from: the task's test split, or a validation part of
# its training split that no client trains on (task_data/validation.py); "auto": the test
# split where the task has one.
EVAL_SPLITS = ("auto", "test", "validation")
TASKS_WITH_TEST_SPLIT = ("gsm8k", "banking77")
# Tasks the server's evaluation suite (server_app/evaluation) can score; run-config eval-tasks.
EVAL_TASKS = ("gsm8k", "banking77", "humaneval", "perplexity")


def parse_tasks(value: str, run_task: str) -> tuple[str, ...]:
    """``"gsm8k,perplexity"`` -> tasks; ``"auto"`` -> the run's task if it has a metric."""
    if value == "auto":
        return (run_task,) if run_task in ("gsm8k", "banking77") else ()
    names = tuple(t.strip() for t in value.split(",") if t.strip())
    unknown = [t for t in names if t not in EVAL_TASKS]
    if unknown:
        raise ValueError(f"unknown evaluation task(s) {unknown}; choose from {EVAL_TASKS} or auto")
    return names
