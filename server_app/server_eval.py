"""Server-side evaluation after every round, and the per-round line of metrics.jsonl.

Flower calls the strategy's ``evaluate_fn`` before round 1 (round 0) and after every round;
here it measures the response-token loss of AdapEmu and AdapFu (or, for the local-only
baseline, of every client's model) on a fixed held-out subset of the task's test split
and writes the round's record (client, distillation, byte and time
metrics gathered by the strategy, plus these).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, MetricRecord
from flwr.common.logger import log

from client_app.local_training import response_loss
from models.fedbiot_models import FedBiOTModels
from models.wire import from_record
from server_app.evaluation.generation import generate
from server_app.evaluation.open_ended import side_by_side
from server_app.evaluation.suite import EvalSettings, evaluate_tasks, metric_keys, parse_tasks
from server_app.preference_eval import PreferenceEvaluator
from server_app.results import RunRecorder
from server_app.run_config import RunConfig
from strategies.fedbiot import FedBiOTMixin
from task_data import collate, load_records, tokenize_records


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
        self.task = config.task.replace("-", "_")
        tokenizer = models.tokenizer
        split = "test" if config.task in ("gsm8k", "banking77") else "train"
        records = load_records(config.task, split, data_dir=config.data_dir or None)
        examples = tokenize_records(tokenizer, records[: config.eval_examples], config.seq_length)
        self.batches = [
            collate(examples[i : i + config.batch_size], tokenizer.pad_token_id)
            for i in range(0, len(examples), config.batch_size)
        ]
        self.every = config.eval_every
        self.last_round = config.num_server_rounds
        self.settings = EvalSettings(
            tasks=parse_tasks(config.eval_tasks, config.task),
            size=config.eval_generation_examples,
            seed=config.seed,
            max_new_tokens=config.eval_max_new_tokens,
            perplexity_task=config.task,
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
        alone, without the round-0 baseline, for studies that measure it once elsewhere)."""
        return bool(self.every) and server_round % self.every == 0

    def _task_metrics(self, server_round: int) -> dict[str, float]:
        """Task metrics (accuracy, ...) of the base model at round 0, then of AdapEmu and
        AdapFu every ``eval-every`` rounds and after the last one."""
        due = self._periodic(server_round) or server_round == self.last_round
        off = not self.settings.tasks or not self.settings.size  # size 0: no task metrics
        if off or not due or hasattr(self.strategy, "client_arrays"):
            return {}
        tokenizer = self.models.tokenizer
        out: dict[str, float] = {}
        if server_round == 0:
            with self.models.full.peft.disable_adapter():
                results = evaluate_tasks(self.models.full.peft, tokenizer, self.settings)
            out.update(metric_keys("base", results))
        if self.models.has_emulator:
            results = evaluate_tasks(self.models.compressed.peft, tokenizer, self.settings)
            out.update(metric_keys("adapemu", results))
        results = evaluate_tasks(self.models.full.peft, tokenizer, self.settings)
        out.update(metric_keys("adapfu", results))
        return out

    def _evaluate(self) -> dict[str, float]:
        """AdapEmu (when there is an emulator) and AdapFu; for the local-only baseline, each
        client's model, reported as mean, spread and per-client values."""
        out: dict[str, float] = {}
        client_arrays = getattr(self.strategy, "client_arrays", None)
        if client_arrays is not None:
            key = f"eval_adapfu_{self.task}_loss"
            losses = {}
            for partition, arrays in sorted(client_arrays.items()):
                self.models.set_adapter(from_record(arrays))
                losses[partition] = response_loss(self.models.full, self.batches)
                out[f"{key}_client{partition}"] = losses[partition]
            if losses:
                out[key] = statistics.fmean(losses.values())
                out[f"{key}_std"] = statistics.pstdev(losses.values())
            else:
                out[key] = response_loss(self.models.full, self.batches)
            return out
        if self.models.has_emulator:
            out[f"eval_adapemu_{self.task}_loss"] = response_loss(
                self.models.compressed, self.batches
            )
        out[f"eval_adapfu_{self.task}_loss"] = response_loss(self.models.full, self.batches)
        return out

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        record: dict[str, float] = {"round": server_round}
        start = time.perf_counter()
        if self.batches:
            record.update(self._evaluate())
        record.update(self._task_metrics(server_round))
        due = self._periodic(server_round) or server_round in (
            self.last_round,
            self.last_sft_round,
        )
        if self.preferences is not None and due:
            record.update(self.preferences())
        record["time_eval_s"] = time.perf_counter() - start
        record.update(self.strategy.round_metrics.get(server_round, {}))
        record["elapsed_s"] = time.perf_counter() - self.started
        self.recorder.append_round(record)
        self.recorder.append_communication(
            server_round, self.strategy.node_bytes.get(server_round, {})
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
