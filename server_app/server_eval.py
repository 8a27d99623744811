"""Server-side evaluation after every round, and the per-round line of metrics.jsonl.

Flower calls the strategy's ``evaluate_fn`` before round 1 (round 0) and after every round;
here it measures the response-token loss of AdapEmu and AdapFu on a fixed held-out subset of
the task's test split and writes the round's record (client, distillation, byte and time
metrics gathered by the strategy, plus these).
"""

from __future__ import annotations

import time
from logging import INFO

from flwr.app import ArrayRecord, MetricRecord
from flwr.common.logger import log

from client_app.local_training import response_loss
from models.fedbiot_models import FedBiOTModels
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
        self.started = time.perf_counter()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        record: dict[str, float] = {"round": server_round}
        start = time.perf_counter()
        if self.batches:
            record[f"eval_adapemu_{self.task}_loss"] = response_loss(
                self.models.compressed, self.batches
            )
            record[f"eval_adapfu_{self.task}_loss"] = response_loss(self.models.full, self.batches)
        record["time_eval_s"] = time.perf_counter() - start
        record.update(self.strategy.round_metrics.get(server_round, {}))
        record["elapsed_s"] = time.perf_counter() - self.started
        self.recorder.append_round(record)
        log(INFO, "round %d metrics: %s", server_round, record)
        return MetricRecord({k: float(v) for k, v in record.items() if k.startswith("eval_")})
