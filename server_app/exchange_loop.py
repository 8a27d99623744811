"""What the server loops of KD-FedLLM and split learning share.

Both talk to clients through the Grid directly instead of through a Flower strategy: a
split round is one exchange per training step, and what a KD round sends is not a model.
This module waits for nodes, samples them, sends one message per node (with the frozen
weights the first time a node is addressed), collects the replies without the Grid's
seconds-long polling sleep, and counts the bytes of every ArrayRecord each way, per node
and per round, through the same ``strategies/shipment.Shipment`` as the strategies; it is
what ``ServerEvaluator`` reads, so these methods write the same run folder:
config.json, metrics.jsonl/csv, communication.csv, sent_arrays.jsonl, plus
received_arrays.jsonl (name, shape and dtype of every array a client sent).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from federation.methods import method_plan
from federation.run_config import ConfigError, RunConfig
from models.fedbiot_models import FedBiOTModels
from server_app.model_card import export_with_cards
from server_app.results import RunRecorder
from server_app.run_setup import open_run
from server_app.server_eval import ServerEvaluator
from server_app.superlink_guard import check_superlink
from strategies.fedbiot import audit_entry
from strategies.lr_schedule import round_learning_rate
from strategies.node_wait import wait_for_nodes
from strategies.reply_checks import screen_contents
from strategies.shipment import Shipment


def _received_entry(server_round: int, step: int, reply: Message) -> dict[str, Any]:
    return {
        "round": server_round,
        "step": step,
        "node": reply.metadata.src_node_id,
        "arrays": {
            name: {key: [list(a.shape), a.dtype] for key, a in record.items()}
            for name, record in reply.content.array_records.items()
        },
    }


def sample_nodes(grid: Grid, config: RunConfig) -> list[int]:
    """``fraction-train`` of the connected nodes, at least ``min-train-nodes``, drawn with
    Python's RNG as Flower's strategies do, after at most ``node-wait-timeout`` seconds of
    waiting for that many (``strategies.node_wait``)."""
    needed = config.min_train_nodes
    reason = f"run-config min-train-nodes={needed}"
    nodes = wait_for_nodes(grid, needed, config.node_wait_timeout, reason)
    count = max(needed, int(config.fraction_train * len(nodes)))
    return sorted(random.sample(nodes, min(count, len(nodes))))


def exchange(grid: Grid, messages: list[Message], timeout: float) -> list[Message]:
    """Push the messages and pull their replies until all came or ``timeout`` passed.

    Polls from 10 ms up to 0.5 s: a split step is short, and the Grid's own
    ``send_and_receive`` sleeps up to seconds between pulls.
    """
    pending = set(grid.push_messages(messages))
    replies: list[Message] = []
    deadline, delay = time.monotonic() + timeout, 0.01
    while pending and time.monotonic() < deadline:
        got = list(grid.pull_messages(pending))
        replies += got
        pending -= {m.metadata.reply_to_message_id for m in got}
        if pending and not got:
            time.sleep(delay)
            delay = min(2 * delay, 0.5)
    return replies


@dataclass
class RoundTrip:
    """Sends one message per node through the run's ``Shipment`` (the frozen weights once
    per node, bytes counted) and logs every array sent and received in the run folder.
    A reply that fails ``reply_checks`` (undecodable arrays, bad metrics or
    ``num-examples``) counts as a node that did not answer; ``max_examples`` caps the
    ``num-examples`` claims (0: no cap)."""

    grid: Grid
    shipment: Shipment
    message_type: str
    timeout: float
    run_dir: Path
    max_examples: float = 0.0

    def __call__(
        self, server_round: int, contents: dict[int, RecordDict], step: int = 0
    ) -> tuple[dict[int, Message], list[int]]:
        """Replies by node (errors left out) and the nodes that did not answer."""
        shipped = self.shipment.offer(server_round, self.grid, contents, self.timeout)
        messages = [
            Message(
                self.shipment.address(server_round, node, body),
                dst_node_id=node,
                message_type=self.message_type,
            )
            for node, body in contents.items()
        ]
        check_superlink()
        with open(self.run_dir / "sent_arrays.jsonl", "a") as f:
            for message in shipped + messages:
                f.write(json.dumps({**audit_entry(server_round, message), "step": step}) + "\n")
        received = exchange(self.grid, messages, self.timeout)
        failed = self.shipment.receive(server_round, received)
        received, rejected = screen_contents(received, [], None, self.max_examples)
        failed = sorted(set(failed) | {r.node for r in rejected})
        replies = {}
        for reply in received:
            if reply.has_error():
                log(INFO, "round %d step %d: error reply %s", server_round, step, reply.error)
            else:
                replies[reply.metadata.src_node_id] = reply
        check_superlink()
        with open(self.run_dir / "received_arrays.jsonl", "a") as f:
            for _, reply in sorted(replies.items()):
                f.write(json.dumps(_received_entry(server_round, step, reply)) + "\n")
        return replies, failed


def round_config(config: RunConfig, server_round: int, digest: str) -> ConfigRecord:
    """What every message of a round carries: its number, the scheduled client learning
    rate, and the digest of the frozen weights the client must use."""
    rate = round_learning_rate(
        server_round,
        config.num_server_rounds,
        config.learning_rate,
        config.learning_rate_min,
        config.lr_scheduler,
    )
    return ConfigRecord(
        {"server-round": server_round, "learning-rate": rate, "model-digest": digest}
    )


def client_means(replies: list[Message]) -> dict[str, float]:
    """Example-weighted means of the clients' metrics (Flower's FedAvg weighting)."""
    if not replies:
        return {}
    mean: MetricRecord = aggregate_metricrecords([r.content for r in replies], "num-examples")
    return {k: float(v) for k, v in mean.items()}


def start_run(
    config: RunConfig,
) -> tuple[RunRecorder, PreTrainedModel, PreTrainedTokenizerBase]:
    """``open_run`` for a method that keeps no checkpoints."""
    if config.resume_from:
        raise ConfigError(f"resume-from: method={config.method} keeps no checkpoints; rerun it")
    return open_run(config, method_plan(config))


def finish_run(
    models: FedBiOTModels, config: RunConfig, recorder: RunRecorder, evaluator: ServerEvaluator
) -> Path:
    """The end of an exchange method's run: the exported models with their cards, then the
    open-ended answers; returns the results folder."""
    check_superlink()
    outputs = export_with_cards(models, config, recorder)
    log(INFO, "Saved %s", ", ".join(f"{name} to {path}" for name, path in outputs.items()))
    evaluator.open_ended(recorder.dir, config.open_ended_examples, config.eval_max_new_tokens)
    return recorder.dir
