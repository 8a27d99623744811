"""Heterogeneous adapter depth (FedBiAlign): each client trains the LoRA of its top s blocks.

The adapter region is the last ``s_max`` blocks. The server gives each node a depth ``s``
(chosen from its memory budget, see ``models/depth_memory.py``) in its train config
(``adapter-depth``). Every client receives the LoRA of the whole region, because the region
blocks below its top ``s`` still run (frozen) in its forward pass with their current values,
and returns only the LoRA of the ``s`` blocks it trained. Aggregation is per block: each
block's LoRA becomes the example-weighted mean over the clients that trained it, and a block
nobody trained keeps its value. Flower's FedAvg requires every reply to hold the same keys,
so this strategy aggregates itself.
"""

from __future__ import annotations

import statistics
from collections.abc import Collection, Iterable, Mapping
from logging import WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency

from federation.messages import BUDGET_QUERY, BUDGET_RECORD, DEPTH_KEY
from models.depth_memory import BUDGET_KEY, MemoryBudgetError, budget_gb, choose_depths
from models.wire import from_record, to_record
from strategies.fedbiot import FedBiOTMixin
from strategies.update_checks import Rejection, update_norm, update_problem
from strategies.update_history import UpdateHistory, UpdateRow, update_stats


def block_of(name: str) -> int:
    """The original block index in a LoRA parameter name ``blocks.<i>.<module>.lora_A``."""
    parts = name.split(".")
    if len(parts) < 4 or parts[0] != "blocks" or not parts[1].isdigit():
        raise ValueError(f"{name!r} is not a LoRA name of the form blocks.<index>.<module>.lora_*")
    return int(parts[1])


def keys_by_block(names: Iterable[str]) -> dict[int, frozenset[str]]:
    """Parameter names grouped by their block."""
    groups: dict[int, set[str]] = {}
    for name in names:
        groups.setdefault(block_of(name), set()).add(name)
    return {block: frozenset(keys) for block, keys in sorted(groups.items())}


def top_block_keys(names: Iterable[str], depth: int) -> frozenset[str]:
    """Names of the last ``depth`` blocks among ``names`` (what a depth-``depth`` client trains)."""
    groups = keys_by_block(names)
    if not 1 <= depth <= len(groups):
        raise ValueError(f"adapter depth {depth} is outside 1..{len(groups)} (the adapter region)")
    return frozenset().union(*list(groups.values())[-depth:])


def per_block_weighted_mean(
    current: Mapping[str, torch.Tensor], updates: Iterable[tuple[Mapping[str, torch.Tensor], float]]
) -> dict[str, torch.Tensor]:
    """Each key's example-weighted mean over the updates that hold it; others keep ``current``.

    Each update holds only what its client trained (whole blocks, once screened). A key whose
    senders all weigh zero also keeps its value. Sums are in float64, cast back to
    ``current``'s dtype.
    """
    sums: dict[str, torch.Tensor] = {}
    weights: dict[str, float] = {}
    for state, weight in updates:
        if weight < 0:
            raise ValueError(f"example weight {weight} must be >= 0")
        for name, value in state.items():
            if name not in current:
                raise ValueError(f"update key {name!r} is not among the aggregated arrays")
            if value.shape != current[name].shape:
                raise ValueError(
                    f"{name}: shape {tuple(value.shape)} != {tuple(current[name].shape)}"
                )
            term = value.to(torch.float64) * weight
            sums[name] = sums[name] + term if name in sums else term
            weights[name] = weights.get(name, 0.0) + weight
    return {
        name: (sums[name] / weights[name]).to(value.dtype)
        if weights.get(name, 0.0) > 0
        else value.clone()
        for name, value in current.items()
    }


def block_subset_problem(
    arrays: ArrayRecord | None, reference: ArrayRecord, allowed: Collection[str]
) -> str | None:
    """Why ``arrays`` is not whole blocks among ``allowed`` of ``reference``'s form, or None."""
    if arrays is None:
        return "no 'arrays' record"
    keys = set(arrays)
    if not keys:
        return "no arrays"
    outside = sorted(keys - set(allowed))
    if outside:
        return f"keys outside its assigned blocks {outside[:3]}"
    partial = sorted(
        block for block, names in keys_by_block(reference).items() if keys & names and names - keys
    )
    if partial:
        return f"incomplete blocks {partial[:3]}: a block's LoRA is returned whole"
    return update_problem(arrays, ArrayRecord({k: reference[k] for k in keys}))


def screen_depth_replies(
    replies: list[Message],
    reference: ArrayRecord,
    max_norm_ratio: float,
    allowed: Mapping[int, Collection[str]],
) -> tuple[list[Message], list[Rejection]]:
    """``update_checks.screen_replies`` for replies that hold whole blocks of ``reference``.

    ``allowed`` maps each node to the keys it was asked to train. The norm check runs per
    block: a client is dropped if, on any block at least three clients trained, its update
    norm exceeds ``max_norm_ratio`` times the median of the others' on that block (update
    norms of different depths are not comparable as a whole).
    """
    kept, rejected = [], []
    block_norms: dict[int, dict[int, float]] = {}  # block -> id(reply) -> norm
    blocks = keys_by_block(reference)
    for reply in replies:
        if reply.has_error():
            kept.append(reply)
            continue
        node = reply.metadata.src_node_id
        if node not in allowed:
            rejected.append(Rejection(node, "it was not sent an adapter depth this round"))
            continue
        arrays = reply.content.array_records.get("arrays")
        problem = block_subset_problem(arrays, reference, allowed[node])
        if problem is not None:
            rejected.append(Rejection(node, problem))
            continue
        for block in {block_of(k) for k in arrays}:
            block_ref = ArrayRecord({k: reference[k] for k in blocks[block]})
            block_norms.setdefault(block, {})[id(reply)] = update_norm(arrays, block_ref)
        kept.append(reply)
    if max_norm_ratio > 0:
        outliers: dict[int, str] = {}
        for block, norms in block_norms.items():
            if len(norms) < 3:
                continue
            for key, norm in norms.items():
                median = statistics.median(v for k, v in norms.items() if k != key)
                if median > 0 and norm > max_norm_ratio * median:
                    outliers.setdefault(
                        key,
                        f"block {block} update norm {norm:.3g} > {max_norm_ratio:g} x "
                        f"median {median:.3g}",
                    )
        rejected += [
            Rejection(r.metadata.src_node_id, outliers[id(r)]) for r in kept if id(r) in outliers
        ]
        kept = [r for r in kept if id(r) not in outliers]
    for rejection in rejected:
        log(WARNING, "Rejected the update of node %d: %s", rejection.node, rejection.reason)
    return kept, rejected


def _weight(content: RecordDict, key: str) -> float:
    """The reply's example count (Flower's convention: its only MetricRecord holds it)."""
    return float(next(iter(content.metric_records.values()))[key])


class HeterogeneousDepthFedAvg(FedAvg):
    """FedAvg where each node trains the LoRA of its own number of top adapter blocks.

    ``node_depths`` maps node ids to depths. A sampled node without one is asked for its
    memory budget (``BUDGET_QUERY``) and given the deepest depth of ``depth_gb`` (GB per
    depth) that fits; a node that does not answer, answers no positive finite budget, or
    whose budget fits no depth sits the round out and is asked again when next sampled.
    ``history`` keeps per-node update statistics of the last ``history_rounds`` rounds, and
    each round's summary joins the train metrics.
    """

    def __init__(
        self,
        *,
        node_depths: Mapping[int, int] | None = None,
        depth_gb: Mapping[int, float] | None = None,
        budget_timeout: float | None = None,
        history_rounds: int = 100,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.node_depths: dict[int, int] = dict(node_depths or {})
        self.depth_gb = dict(depth_gb or {})
        self.budget_timeout = budget_timeout
        self.history = UpdateHistory(history_rounds)
        # This round's: keys each node may return, and the tensors sent.
        self.allowed_keys: dict[int, frozenset[str]] = {}
        self._sent: dict[str, torch.Tensor] = {}
        self._received: dict[int, dict[str, torch.Tensor]] = {}
        self.sat_out: list[int] = []  # this round's sampled nodes without a depth

    def _learn_depths(self, grid: Grid, nodes: list[int]) -> None:
        """Ask nodes without a depth for their budgets and choose their depths."""
        unknown = [n for n in nodes if n not in self.node_depths]
        if not unknown:
            return
        if not self.depth_gb:
            raise ValueError(f"nodes {unknown} have no adapter depth and no memory per depth")
        queries = [Message(RecordDict(), message_type=BUDGET_QUERY, dst_node_id=n) for n in unknown]
        budgets, failures = {}, {n: "no reply" for n in unknown}
        for reply in grid.send_and_receive(queries, timeout=self.budget_timeout):
            node = reply.metadata.src_node_id
            record = None if reply.has_error() else reply.content.metric_records.get(BUDGET_RECORD)
            if record is not None and BUDGET_KEY in record:
                try:
                    budgets[node] = budget_gb(record[BUDGET_KEY], f"its reply's {BUDGET_KEY}")
                    failures.pop(node, None)
                except MemoryBudgetError as error:
                    failures[node] = str(error)
            else:
                failures[node] = reply.error.reason if reply.has_error() else "malformed reply"
        for node, reason in failures.items():
            log(WARNING, "Node %d sits this round out: no memory budget (%s)", node, reason)
        # A node whose budget fits no depth sits out (and is asked again next round): one
        # small site must not end everybody's run.
        for node, budget in budgets.items():
            try:
                self.node_depths.update(choose_depths({node: budget}, self.depth_gb))
            except MemoryBudgetError as error:
                log(WARNING, "Node %d sits this round out: %s", node, error)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The whole region's LoRA to every sampled node, with its depth in its config."""
        sampled = [
            m.metadata.dst_node_id
            for m in super().configure_train(server_round, arrays, config, grid)
        ]
        self._learn_depths(grid, sampled)
        self._sent = from_record(arrays)
        self._received = {}
        self.allowed_keys = {
            node: top_block_keys(arrays, self.node_depths[node])
            for node in sampled
            if node in self.node_depths
        }
        self.sat_out = sorted(node for node in sampled if node not in self.node_depths)
        if not self.allowed_keys:
            raise RuntimeError(
                f"round {server_round}: every sampled node sits out for want of a usable "
                f"memory budget (nodes {self.sat_out}; the log names each one's reason)"
            )
        return [
            Message(
                RecordDict(
                    {
                        self.arrayrecord_key: arrays,
                        self.configrecord_key: ConfigRecord(
                            {**dict(config.items()), DEPTH_KEY: self.node_depths[node]}
                        ),
                    }
                ),
                message_type=MessageType.TRAIN,
                dst_node_id=node,
            )
            for node in self.allowed_keys
        ]

    def screen_train_replies(
        self, replies: list[Message], reference: ArrayRecord, max_norm_ratio: float
    ) -> tuple[list[Message], list[Rejection]]:
        """Drop replies that are not whole blocks among those the node was asked to train.

        The kept updates are remembered as received: a client-level DP layer between the
        mixin and this class replaces them by the private mean before aggregation, and the
        update history describes each client's own update."""
        kept, rejected = screen_depth_replies(replies, reference, max_norm_ratio, self.allowed_keys)
        self._received = {
            r.metadata.src_node_id: from_record(r.content[self.arrayrecord_key])
            for r in kept
            if not r.has_error()
        }
        return kept, rejected

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Per-block example-weighted mean of the (screened) replies; metrics as FedAvg."""
        valid, _ = self._check_and_log_replies(replies, is_train=True, validate=False)
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        validate_message_reply_consistency(contents, self.weighted_by_key, check_arrayrecord=False)
        received = [
            (
                m.metadata.src_node_id,
                from_record(c[self.arrayrecord_key]),
                _weight(c, self.weighted_by_key),
            )
            for m, c in zip(valid, contents, strict=True)
        ]
        new = per_block_weighted_mean(self._sent, [(state, n) for _, state, n in received])
        for node, state, n in received:
            own = self._received.get(node, state)
            norm, cosine = update_stats(self._sent, new, own)
            depth = self.node_depths.get(node, len(keys_by_block(own)))
            self.history.add(server_round, UpdateRow(node, depth, int(n), norm, cosine))
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        metrics.update(self.history.round_summary(server_round))
        metrics["clients_sat_out"] = len(self.sat_out)
        return to_record(new), metrics


class FedBiAlign(FedBiOTMixin, HeterogeneousDepthFedAvg):
    """FedBiOT (emulator, distillation, byte accounting) with budget-chosen adapter depths.

    Screening replies needs the mixin to call ``self.screen_train_replies`` where it now
    calls ``update_checks.screen_replies``: its rule (exactly the keys sent) rejects every
    client that trained fewer than all adapter blocks.
    """

    screen_train_replies = HeterogeneousDepthFedAvg.screen_train_replies
