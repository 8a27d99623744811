"""Server-side evaluation on due rounds, and the per-round line of metrics.jsonl.

Flower calls the strategy's ``evaluate_fn`` before round 1 (round 0) and after every round.
On due rounds (round 0, every ``eval-every`` rounds, the last one) this scores the base model,
AdapEmu and AdapFu (or, for the local-only baseline, every client's model) on a fixed held-out
selection of the task's test split — the same texts for every run, so runs compare pairwise —
with intervals and paired differences against the base (``server_app/evaluation/heldout.py``).
Every round writes its record (client, distillation, byte and time metrics gathered by the
strategy, plus these) and the per-text scores go to ``heldout.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import statistics
import time
from collections.abc import Callable
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, MetricRecord
from flwr.common.logger import log

from federation.run_choices import parse_tasks
from federation.run_config import RunConfig
from models.cache_dir import cache_root
from models.fedbiot_models import FedBiOTModels
from models.fidelity import per_text_agreement
from models.wire import from_record
from server_app.evaluation.confidence import agreement_intervals, interval_cell
from server_app.evaluation.generation import generate
from server_app.evaluation.heldout import HeldoutResult, score_records
from server_app.evaluation.open_ended import side_by_side
from server_app.evaluation.suite import EvalSettings, evaluate_tasks, metric_keys
from server_app.preference_eval import PreferenceEvaluator
from server_app.results import RunRecorder
from server_app.run_setup import public_heldout_records
from server_app.superlink_guard import check_superlink
from strategies.fedbiot import FedBiOTMixin
from task_data import collate, tokenize_records
from task_data.sources import default_data_dir
from task_data.tables import JSON_SUFFIXES, TABLE_SUFFIXES
from task_data.validation import heldout_test_indices, validation_split


def heldout_records(config: RunConfig) -> list[dict[str, str]]:
    """The run's held-out texts: a fixed random selection of ``eval-examples`` records of the
    task's test split, or the validation part of its training split that clients never see
    (``eval-split``)."""
    if not config.eval_examples:
        return []
    if config.resolved_eval_split == "validation":
        return validation_split(config.task_records(), config.eval_examples)[1]
    records = config.task_records("test")
    return [records[i] for i in heldout_test_indices(len(records), config.eval_examples)]


def _read_cached(path: Path, texts: int, ranked: int) -> HeldoutResult | None:
    """A cached base result, or None (logged, then recomputed) when the file is unreadable or
    does not hold one score per held-out text: a cache is a convenience, never a source."""
    try:
        result = HeldoutResult(**json.loads(path.read_text()))
        ok = len(result.nll) == len(result.tokens) == texts and len(result.predicted) == ranked
    except (OSError, ValueError, TypeError) as error:
        ok, reason = False, str(error)
    else:
        reason = "it does not hold one score per held-out text"
    if ok:
        return result
    log(WARNING, "ignoring the cached base scores %s (%s); scoring the base again", path, reason)
    return None


def task_key(task: str) -> str:
    """The task's name in metric keys: the last name of its file, folder or hub id, without
    the file suffix (``openai/gsm8k`` gives ``gsm8k``)."""
    name = Path(task.rstrip("/")).name
    for suffix in (*JSON_SUFFIXES, *TABLE_SUFFIXES):
        name = name.removesuffix(suffix)
    return re.sub(r"\W", "_", name)


class ServerEvaluator:
    """``evaluate_fn`` for ``Strategy.start``."""

    def __init__(
        self,
        config: RunConfig,
        models: FedBiOTModels,
        strategy: FedBiOTMixin,
        recorder: RunRecorder,
    ) -> None:
        self.models = models
        self.strategy = strategy
        self.recorder = recorder
        self.config = config
        self.task = task_key(config.task)
        self.records = heldout_records(config)
        tasks = parse_tasks(config.eval_tasks, config.task)
        # Banking77 by label ranking runs inside the held-out pass (paired, with intervals).
        self.labels: list[str] = []
        self.ranked = 0
        if "banking77" in tasks and config.banking77_eval == "rank" and config.task == "banking77":
            root = Path(config.data_dir) if config.data_dir else default_data_dir()
            self.labels = json.loads((root / "banking77" / "categories.json").read_text())
            self.ranked = min(config.eval_generation_examples, len(self.records))
            tasks = tuple(t for t in tasks if t != "banking77")
        self.base: HeldoutResult | None = None
        self.fidelity_batches: dict[str, list[dict]] | None = None
        self.base_tasks_done = False
        self.results: dict[str, dict[str, float]] = {}
        self.every = config.eval_every
        self.last_round = config.num_server_rounds
        self.settings = EvalSettings(
            tasks=tasks,
            size=config.eval_generation_examples,
            seed=config.seed,
            max_new_tokens=config.eval_max_new_tokens,
            perplexity_task=config.task,
            perplexity_split=config.split,
            perplexity_columns=config.columns,
            perplexity_subset=config.subset,
            banking77_mode=config.banking77_eval,
            data_dir=config.data_dir or None,
        )
        self.preferences = (
            PreferenceEvaluator(config, models)
            if config.resolved_stage != "sft" and config.preference_eval_pairs
            else None
        )
        # Preference metrics when task metrics are due, and on the last SFT round ("before").
        self.last_sft_round = (
            config.num_server_rounds - config.dpo_rounds
            if config.resolved_stage == "sft+dpo"
            else 0
        )
        self.started = time.perf_counter()

    def _periodic(self, server_round: int) -> bool:
        """Every ``eval-every`` rounds from round 0; ``eval-every=0``: never (the last round
        alone)."""
        return bool(self.every) and server_round % self.every == 0

    def _due(self, server_round: int) -> bool:
        return self._periodic(server_round) or server_round == self.last_round

    def _task_metrics(self, server_round: int) -> dict[str, float]:
        """Generation task metrics (accuracy, ...) of the base model on the first due round,
        and of AdapEmu and AdapFu on every due round."""
        off = not self.settings.tasks or not self.settings.size  # size 0: no task metrics
        if off or not self._due(server_round) or hasattr(self.strategy, "client_arrays"):
            return {}
        tokenizer = self.models.tokenizer
        out: dict[str, float] = {}
        if not self.base_tasks_done:  # round 0, or the first due round (eval-every=0)
            with self.models.full.peft.disable_adapter():
                results = evaluate_tasks(self.models.full.peft, tokenizer, self.settings)
            out.update(metric_keys("base", results))
            self.base_tasks_done = True
        if self.models.has_emulator:
            results = evaluate_tasks(self.models.compressed.peft, tokenizer, self.settings)
            out.update(metric_keys("adapemu", results))
        results = evaluate_tasks(self.models.full.peft, tokenizer, self.settings)
        out.update(metric_keys("adapfu", results))
        return out

    def _score(self, model, description: str) -> HeldoutResult:
        return score_records(
            model,
            self.models.tokenizer,
            self.records,
            self.config.seq_length,
            batch_size=self.config.batch_size,
            labels=self.labels,
            ranked=self.ranked,
            description=description,
        )

    def _base(self) -> HeldoutResult:
        """The untrained model's scores (the adapter switched off): computed once per run,
        and kept on disk under the weights' and texts' digest so that the next run of the
        same model on the same texts (a sweep, a study, ``make run`` again) reads them."""
        if self.base is not None:
            return self.base
        peft = self.models.full.peft
        path = cache_root() / "heldout" / f"{self._base_key()}.json"
        if path.is_file():
            cached = _read_cached(path, len(self.records), self.ranked)
            if cached is not None:
                self.base = cached
                log(INFO, "base model's held-out scores read from %s", path)
                return self.base
        with peft.disable_adapter():
            self.base = self._score(peft, "base held-out")
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        check_superlink()
        partial.write_text(json.dumps(self.base.to_json()))
        partial.replace(path)  # atomic: a concurrent run never reads half a file
        return self.base

    def _base_key(self) -> str:
        """Digest of everything the base scores depend on: every base weight, the texts, the
        labels, the sequence length and the batch size (padding changes float sums)."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.models.full.peft.named_parameters()):
            if "lora_" not in name:
                digest.update(name.encode())
                digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
        settings = [
            self.records,
            self.labels,
            self.ranked,
            self.config.seq_length,
            self.config.batch_size,
            str(self.models.tokenizer.chat_template),
        ]
        digest.update(json.dumps(settings, sort_keys=True).encode())
        return digest.hexdigest()

    def _keys(self, variant: str, summary: dict[str, float]) -> dict[str, float]:
        self.results[variant] = summary
        return {f"eval_{variant}_{self.task}_{name}": value for name, value in summary.items()}

    def _heldout(self, server_round: int) -> dict[str, float]:
        """Held-out scores of the base (round 0), AdapEmu and AdapFu on a due round, each
        compared with the base on the same texts; per-text scores go to heldout.jsonl."""
        if not self.records or not self._due(server_round):
            return {}
        client_arrays = getattr(self.strategy, "client_arrays", None)
        if client_arrays is not None:
            return self._local_only(server_round, client_arrays)
        base = self._base()
        scored: dict[str, HeldoutResult] = {}
        if "base" not in self.results:  # round 0, or the first due round after a resume
            scored["base"] = base
        if self.models.has_emulator:
            scored["adapemu"] = self._score(self.models.compressed.peft, "adapemu held-out")
        # Before round 1 the LoRA update is zero (B = 0), so AdapFu is the base model.
        scored["adapfu"] = (
            base if server_round == 0 else self._score(self.models.full.peft, "adapfu held-out")
        )
        out: dict[str, float] = self._fidelity()
        seed = self.config.seed
        for variant, result in scored.items():
            reference = None if variant == "base" else base
            out.update(self._keys(variant, result.summary(reference, seed)))
        self.recorder.append_jsonl(
            "heldout.jsonl",
            [
                {"round": server_round, "variant": v, "task": self.task, **r.to_json()}
                for v, r in scored.items()
            ],
        )
        if server_round == self.last_round:
            table = summary_table(self.task, self.results)
            check_superlink()
            (self.recorder.dir / "heldout_summary.md").write_text(table)
            log(INFO, "held-out evaluation after round %d:\n%s", server_round, table)
        return out

    def _fidelity(self) -> dict[str, float]:
        """E∘A against E*∘A (KL per response token, top-1 agreement) on held-out task texts and
        on public texts distillation never reads: how much of what the adapter learns on the
        emulator can carry over to the full model."""
        if not self.models.has_emulator or not self.config.fidelity_examples:
            return {}
        if self.fidelity_batches is None:
            tokenizer, size = self.models.tokenizer, self.config.fidelity_examples
            public = public_heldout_records(self.config, size)
            self.fidelity_batches = {
                name: [
                    collate(examples[i : i + self.config.batch_size], tokenizer.pad_token_id)
                    for i in range(0, len(examples), self.config.batch_size)
                ]
                for name, records in (("task", self.records[:size]), ("public", public))
                if (examples := tokenize_records(tokenizer, records, self.config.seq_length))
            }
        full, emulated, out = self.models.full.peft, self.models.compressed.peft, {}
        for name, batches in self.fidelity_batches.items():
            texts = per_text_agreement(full, emulated, batches)
            if texts["tokens"]:
                for metric, interval in agreement_intervals(texts).items():
                    out |= interval.keys(f"fidelity_{name}_{metric}")
        return out

    def _local_only(self, server_round: int, client_arrays: dict) -> dict[str, float]:
        """Each client's model: its loss per client, their mean and spread; per-text scores go
        to heldout.jsonl (variant ``client<partition>``) for paired comparisons."""
        key = f"eval_adapfu_{self.task}_loss"
        losses, rows = {}, []
        for partition, arrays in sorted(client_arrays.items()):
            self.models.set_adapter(from_record(arrays))
            result = self._score(self.models.full.peft, f"client {partition}")
            losses[partition] = result.summary()["loss"]
            rows.append({"round": server_round, "variant": f"client{partition}",
                         "task": self.task, **result.to_json()})  # fmt: skip
        self.recorder.append_jsonl("heldout.jsonl", rows)
        out = {f"{key}_client{partition}": value for partition, value in losses.items()}
        if losses:
            out[key] = statistics.fmean(losses.values())
            out[f"{key}_std"] = statistics.pstdev(losses.values())
        return out

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        record: dict[str, float] = {"round": server_round}
        start = time.perf_counter()
        record.update(self._heldout(server_round))
        record.update(self._task_metrics(server_round))
        due = self._periodic(server_round) or server_round in (
            self.last_round,
            self.last_sft_round,
        )
        if self.preferences is not None and due:
            scores, rows = self.preferences(server_round)
            record.update(scores)
            self.recorder.append_jsonl("preference_heldout.jsonl", rows)
        record["time_eval_s"] = time.perf_counter() - start
        record.update(self.strategy.round_metrics.get(server_round, {}))
        record["elapsed_s"] = time.perf_counter() - self.started
        record["unix_time_s"] = time.time()  # places the row on a bench's own clock
        self.recorder.append_round(record)
        self.recorder.append_communication(
            server_round,
            self.strategy.node_bytes.get(server_round, {}),
            self.strategy.node_partitions.get(server_round, {}),
        )
        history = getattr(self.strategy, "history", None)
        if history is not None and server_round in history.rounds:
            self.recorder.append_jsonl("update_history.jsonl", history.rows(server_round))
        log(INFO, "round %d metrics: %s", server_round, record)
        return MetricRecord({k: float(v) for k, v in record.items() if k.startswith("eval_")})

    def open_ended(self, out_dir: Path, size: int, max_new_tokens: int) -> Path | None:
        """Base, AdapEmu and AdapFu answers to ``size`` open-ended questions, side by side."""
        if not size or hasattr(self.strategy, "client_arrays"):
            return None
        check_superlink()
        tokenizer = self.models.tokenizer

        def answers(model) -> Callable[[list[list[int]]], list[str]]:
            return lambda prompts: generate(model, tokenizer, prompts, max_new_tokens)

        def base(prompts: list[list[int]]) -> list[str]:
            with self.models.full.peft.disable_adapter():
                return generate(self.models.full.peft, tokenizer, prompts, max_new_tokens)

        variants = {"base": base}
        if self.models.has_emulator:
            variants["adapemu"] = answers(self.models.compressed.peft)
        variants["adapfu"] = answers(self.models.full.peft)
        return side_by_side(
            variants, tokenizer, size, self.settings.seed, out_dir, self.settings.data_dir
        )


def summary_table(task: str, results: dict[str, dict[str, float]]) -> str:
    """Markdown table of the last held-out scores of each model, with 95 % intervals and the
    paired differences against the base (negative loss difference: better than the base)."""
    lines = [
        f"Held-out {task}: loss = response NLL per token (nats); accuracy by label ranking; "
        "95 % intervals (bootstrap over texts; Wilson for accuracy); differences paired on "
        "the same texts (McNemar's exact p for accuracy).",
        "",
        "| model | texts (loss/ranked) | loss | loss − base | accuracy % "
        "| accuracy − base (pp) | p | macro-F1 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for variant, summary in results.items():
        p = summary.get("accuracy_vs_base_p")
        cells = [
            variant,
            "/".join(
                str(int(summary[k])) for k in ("loss_examples", "accuracy_examples") if k in summary
            ),
            interval_cell(summary, "loss"),
            interval_cell(summary, "loss_vs_base"),
            interval_cell(summary, "accuracy", 100, 1),
            interval_cell(summary, "accuracy_vs_base", 100, 1),
            "–" if p is None else f"{p:.3g}",
            f"{summary['macro_f1']:.3f}" if "macro_f1" in summary else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
