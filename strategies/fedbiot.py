"""The FedBiOT server step: aggregate the adapter LoRA, then distil the emulator.

``FedBiOTMixin`` goes in front of any Flower message-API strategy whose arrays are the
trained LoRA (``strategies/algorithms.py`` composes it with FedAvg, FedProx, FedAvgM,
SCAFFOLD, FedAdam, FedYogi, FedAdagrad and the robust aggregators). The inner strategy
samples nodes and aggregates the arrays (example-weighted mean for FedAvg, FedBiOT Eq. 11);
the mixin adds to each outgoing message the emulator LoRA, the round's client learning rate
and, the first time a node is sampled, the compressed frozen weights; after aggregation it
installs the new adapter in the server's models and runs ``distill_steps`` of emulator
distillation. With a fixed DPO reference it keeps the LoRA sent in the first DPO round
(adapter and emulator: the model at the start of DPO) and sends it with every DPO round,
since a client sampled later never saw that model. The same mixin serves the methods
without an emulator (FedIT, local, central): they have no emulator record and no distillation.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from federation.messages import DELTA_C, DPO_REFERENCE
from models.distillation import EmulatorDistiller
from models.fedbiot_models import FedBiOTModels
from models.wire import from_record, to_record
from strategies.local_only import LocalOnly
from strategies.node_wait import wait_for_nodes
from strategies.reply_checks import finite_state, screen_contents
from strategies.scaffold import Scaffold
from strategies.shipment import Shipment
from strategies.update_checks import Rejection, bound_norms, screen_replies, update_problem

# Client metrics that mean nothing once averaged over clients (ids, not quantities): kept
# out of the aggregated metrics Flower prints and the run's metrics.jsonl.
_PER_CLIENT_KEYS = frozenset({"partition-id", "num-partitions"})


def audit_entry(server_round: int, message: Message) -> dict[str, Any]:
    """Name, shape and SHA-256 of every array in a message, for ``sent_arrays.jsonl``."""
    return {
        "round": server_round,
        "node": message.metadata.dst_node_id,
        "type": message.metadata.message_type,
        "arrays": {
            record_name: {
                key: [list(array.shape), array.dtype, hashlib.sha256(array.data).hexdigest()]
                for key, array in record.items()
            }
            for record_name, record in message.content.array_records.items()
        },
    }


def _skipped(reply: Message) -> bool:
    metrics = reply.content.metric_records.get("metrics")
    return metrics is not None and bool(metrics.get("dpo_skipped", 0))


class FedBiOTMixin:
    """Emulator transport, one-time model download, distillation and byte accounting."""

    def __init__(
        self,
        *,
        models: FedBiOTModels,
        distiller: EmulatorDistiller | None,
        distill_steps: int,
        learning_rate: Callable[[int], float] | None = None,
        stage: Callable[[int], str] | None = None,
        audit_path: Path | None = None,
        before_write: Callable[[], None] | None = None,
        max_norm_ratio: float = 0.0,
        max_update_norm: float = 0.0,
        max_examples: float = 0.0,
        fixed_dpo_reference: bool = False,
        node_wait_timeout: float = 600.0,
        node_wait_reason: str = "",
        offer_timeout: float = 600.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.offer_timeout = offer_timeout  # for the nodes' answers to the model offer
        # Flower's sampling waits for nodes without a deadline: ours waits first, bounded.
        self.node_wait_timeout = node_wait_timeout
        self.node_wait_reason = node_wait_reason
        self.max_norm_ratio = max_norm_ratio
        self.max_update_norm = max_update_norm
        self.max_examples = max_examples
        self.fixed_dpo_reference = fixed_dpo_reference
        # Set at the first DPO round and checkpointed: a resumed run keeps its reference.
        self.dpo_reference: ArrayRecord | None = None
        # A resumed run restarts Flower's round counter at 1; this shifts it back.
        self.round_offset = 0
        self._round_arrays: ArrayRecord | None = None
        self.audit_path = audit_path
        # The ServerApp's check before it writes its run folder (a gone SuperLink raises).
        self.before_write = before_write
        self.models = models
        self.distiller = distiller
        self.distill_steps = distill_steps if distiller is not None else 0
        self.learning_rate = learning_rate
        self.stage = stage
        self.shipment = Shipment(models)
        # What ServerEvaluator and the DP wrapper read and extend, kept by the shipment.
        self.round_metrics = self.shipment.round_metrics
        self.node_bytes = self.shipment.node_bytes
        self.node_partitions = self.shipment.node_partitions
        self._sent_at = 0.0
        self._phase_start = 0.0  # when configure_train or configure_evaluate began
        self.skipped_nodes: set[int] = set()

    def _with_fedbiot_records(
        self,
        server_round: int,
        grid: Grid,
        messages: Iterable[Message],
        extra: RecordDict | None = None,
    ) -> list[Message]:
        """Copy each message, adding emulator LoRA, the ``extra`` records and, once per node,
        the frozen weights (unless its store holds them: the shipment offers them first)."""
        messages = list(messages)
        nodes = [m.metadata.dst_node_id for m in messages]
        shipped = self.shipment.offer(server_round, grid, nodes, self.offer_timeout)
        emulator = to_record(self.models.emulator_state()) if self.models.has_emulator else None
        out = []
        for message in messages:
            node = message.metadata.dst_node_id
            content = RecordDict(dict(message.content.items()))
            config = ConfigRecord(dict(content["config"].items()))
            config["model-digest"] = self.models.frozen_digest
            content["config"] = config
            if emulator is not None:
                content["emulator"] = emulator
            for name, record in (extra or RecordDict()).items():
                content[name] = record
            out.append(
                Message(
                    content=self.shipment.address(server_round, node, content),
                    message_type=message.metadata.message_type,
                    dst_node_id=node,
                )
            )
        if self.audit_path is not None:
            if self.before_write is not None:
                self.before_write()
            with open(self.audit_path, "a") as f:
                for message in shipped + out:
                    f.write(json.dumps(audit_entry(server_round, message)) + "\n")
        return out

    def screen_train_replies(
        self, replies: list[Message], reference: ArrayRecord, max_norm_ratio: float
    ) -> tuple[list[Message], list[Rejection]]:
        """Valid replies and rejected ones; strategies whose clients return a subset of the
        arrays (per-client adapter depth) screen differently."""
        return screen_replies(replies, reference, max_norm_ratio)

    def _screen(self, replies: list[Message]) -> tuple[list[Message], list[Rejection]]:
        """Every check a train reply passes before the inner strategy sees it: its records
        as a whole, then its update against the arrays sent, then the absolute norm bound."""
        scaffold = isinstance(self, Scaffold)
        replies, rejected = screen_contents(
            replies, ["arrays"], [DELTA_C] if scaffold else [], self.max_examples
        )
        reference = self._round_arrays
        if reference is None:
            return replies, rejected
        replies, more = self.screen_train_replies(replies, reference, self.max_norm_ratio)
        rejected += more
        if isinstance(self, LocalOnly):
            replies, more = self.screen_partitions(replies)
            rejected += more
        if scaffold:  # after the update itself passed: its delta_c_i is checked against it
            bad = {
                id(r): problem
                for r in replies
                if not r.has_error()
                and DELTA_C in r.content
                and (problem := self._control_delta_problem(r, reference)) is not None
            }
            for reply in [r for r in replies if id(r) in bad]:
                node, reason = reply.metadata.src_node_id, f"{DELTA_C}: {bad[id(reply)]}"
                log(WARNING, "Rejected the reply of node %d: %s", node, reason)
                rejected.append(Rejection(node, reason))
            replies = [r for r in replies if id(r) not in bad]
        replies, more = bound_norms(replies, reference, self.max_update_norm)
        return replies, rejected + more

    def _control_delta_problem(self, reply: Message, reference: ArrayRecord) -> str | None:
        """SCAFFOLD: why a reply's ``delta_c_i`` is malformed or not its update's, or None."""
        delta = reply.content[DELTA_C]
        problem = update_problem(delta, reference)
        if problem is None:
            problem = self.control_delta_problem(delta, reply.content["arrays"])  # type: ignore[attr-defined]
        return problem

    def _wait_for_nodes(self, grid: Grid, sample_minimum: int) -> None:
        """At most ``node_wait_timeout`` seconds for the nodes Flower's sampling waits for
        (``min_available_nodes``, at least the sample's minimum), then a clear error."""
        needed = max(self.min_available_nodes, sample_minimum)  # type: ignore[attr-defined]
        reason = self.node_wait_reason or f"min_available_nodes={needed}"
        wait_for_nodes(grid, needed, self.node_wait_timeout, reason)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._phase_start = time.perf_counter()
        server_round += self.round_offset
        config = ConfigRecord(dict(config.items()))
        if self.learning_rate is not None:
            config["learning-rate"] = self.learning_rate(server_round)
        if self.stage is not None:
            config["stage"] = self.stage(server_round)
        self._round_arrays = arrays
        extra = RecordDict()
        if self.fixed_dpo_reference and config.get("stage") == "dpo":
            if self.dpo_reference is None:
                start = from_record(arrays)
                if self.models.has_emulator:
                    start.update(self.models.emulator_state())
                self.dpo_reference = to_record(start)
            extra[DPO_REFERENCE] = self.dpo_reference
        self._wait_for_nodes(grid, self.min_train_nodes)  # type: ignore[attr-defined]
        messages = super().configure_train(server_round, arrays, config, grid)
        decorated = self._with_fedbiot_records(server_round, grid, messages, extra)
        metrics = self.shipment.metrics(server_round)
        metrics["clients_sampled"] = len(decorated)
        self._sent_at = time.perf_counter()
        # Sampling, the model offer (round 1: the weights to one node per store), messages.
        metrics["time_configure_s"] = self._sent_at - self._phase_start
        return decorated

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        replies = list(replies)
        metrics = self.shipment.metrics(server_round)
        metrics["time_client_train_s"] = time.perf_counter() - self._sent_at
        metrics["clients_failed"] = len(self.shipment.receive(server_round, replies))
        # Selective alignment: a node without preference data skips a DPO round.
        skipped = [r for r in replies if not r.has_error() and _skipped(r)]
        replies = [r for r in replies if r not in skipped]
        metrics["clients_skipped"] = len(skipped)
        self.skipped_nodes = {r.metadata.src_node_id for r in skipped}  # read by client DP
        replies, rejected = self._screen(replies)
        metrics["clients_rejected"] = len(rejected)
        # The slowest client's own training time: what the round's client phase waits for.
        # Read from screened replies only: their metrics are checked to be finite numbers.
        seconds = [
            float(r.content.metric_records["metrics"]["train_seconds"])
            for r in replies
            if not r.has_error() and "train_seconds" in r.content.metric_records["metrics"]
        ]
        if seconds:
            metrics["train_seconds_max"] = max(seconds)
            metrics["train_seconds_sum"] = sum(seconds)  # the phase's floor if nodes share cores
        if not any(not r.has_error() for r in replies) and (
            not skipped or metrics["clients_failed"] or rejected
        ):
            raise RuntimeError(
                f"round {server_round}: no client update to aggregate "
                f"({metrics['clients_failed']} failed, {len(rejected)} rejected, "
                f"{len(skipped)} skipped; see the log above for each node's error)"
            )
        start = time.perf_counter()
        arrays, train_metrics = super().aggregate_train(server_round, replies)
        metrics["time_aggregate_s"] = time.perf_counter() - start
        if arrays is not None:
            self.models.set_adapter(from_record(arrays))
        if train_metrics is not None:  # what Flower prints and keeps per round, too
            train_metrics = MetricRecord(
                {k: v for k, v in train_metrics.items() if k not in _PER_CLIENT_KEYS}
            )
            metrics.update({k: float(v) for k, v in train_metrics.items()})
        if self.distiller is not None and self.distill_steps:
            start = time.perf_counter()
            metrics.update(self.distiller.run(self.distill_steps))
            metrics["time_distill_s"] = time.perf_counter() - start
        finite_state(self.models.adapter_state(), "adapter LoRA")
        if self.models.has_emulator:
            finite_state(self.models.emulator_state(), "emulator LoRA")
        log(
            INFO,
            "round %d: client loss %.4f, distill loss %s, bytes up %d, down %d "
            "(+%d model download)",
            server_round,
            metrics.get("train_loss", float("nan")),
            f"{metrics['distill_loss']:.4f}" if "distill_loss" in metrics else "-",
            metrics["bytes_up"],
            metrics["bytes_down"],
            metrics["bytes_model_download"],
        )
        return arrays, train_metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._phase_start = time.perf_counter()
        server_round += self.round_offset
        if self.fraction_evaluate > 0:  # type: ignore[attr-defined]
            self._wait_for_nodes(grid, self.min_evaluate_nodes)  # type: ignore[attr-defined]
        messages = super().configure_evaluate(server_round, arrays, config, grid)
        return self._with_fedbiot_records(server_round, grid, messages)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        server_round += self.round_offset
        replies = list(replies)
        self.shipment.receive(server_round, replies)
        replies, rejected = screen_contents(replies, [], [], self.max_examples)
        self.shipment.metrics(server_round)["client_eval_rejected"] = len(rejected)
        result = super().aggregate_evaluate(server_round, replies)
        metrics = self.shipment.metrics(server_round)
        if result is not None:
            metrics.update({f"client_{k}": float(v) for k, v in result.items()})
        metrics["time_client_eval_s"] = time.perf_counter() - self._phase_start
        return result


class FedBiOT(FedBiOTMixin, FedAvg):
    """FedBiOT with FedAvg aggregation of the adapter (the paper's Eq. 11)."""
