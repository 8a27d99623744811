"""FedBiAlign's heterogeneous adapter depth: per-block aggregation by hand, and the strategy
sending each node its depth and averaging what comes back."""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from federation.messages import (
    BUDGET_QUERY,
    BUDGET_RECORD,
    DEPTH_KEY,
    OFFER_QUERY,
    budget_reply,
    depth_blocks,
)
from models.depth_memory import BUDGET_KEY
from models.fedbiot_models import FedBiOTModels
from models.wire import from_record, to_record
from strategies.depth_aggregation import (
    FedBiAlign,
    HeterogeneousDepthFedAvg,
    block_of,
    per_block_weighted_mean,
)
from tests.test_aggregation import caplog_records
from tests.tiny import ADAPTER_REGION as REGION
from tests.tiny import tiny_fedbiot_models


def _key(block: int) -> str:
    return f"blocks.{block}.mlp.down_proj.lora_A"


def _t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# --- per-block aggregation, by hand ----------------------------------------------------------

CURRENT = {_key(b): _t(b, -b) for b in REGION}
DEPTH_2 = ({_key(6): _t(1, 2), _key(7): _t(3, 4)}, 1)
DEPTH_4 = ({_key(4): _t(2, 0), _key(5): _t(4, 4), _key(6): _t(5, 6), _key(7): _t(7, 8)}, 3)
DEPTH_6 = (
    {
        _key(2): _t(8, 8),
        _key(3): _t(0, 4),
        _key(4): _t(6, 4),
        _key(5): _t(0, 8),
        _key(6): _t(1, 2),
        _key(7): _t(11, 0),
    },
    4,
)


def _assert_state(got: dict[str, torch.Tensor], expected: dict[int, tuple[float, float]]) -> None:
    assert set(got) == {_key(b) for b in expected}
    for block, values in expected.items():
        np.testing.assert_allclose(got[_key(block)].numpy(), values, rtol=1e-6)


def test_per_block_mean_of_depths_2_4_and_6_by_hand() -> None:
    new = per_block_weighted_mean(CURRENT, [DEPTH_2, DEPTH_4, DEPTH_6])
    _assert_state(
        new,
        {
            2: (8, 8),  # only the depth-6 client trained blocks 2 and 3
            3: (0, 4),
            4: (30 / 7, 16 / 7),  # (3 * (2, 0) + 4 * (6, 4)) / 7
            5: (12 / 7, 44 / 7),  # (3 * (4, 4) + 4 * (0, 8)) / 7
            6: (2.5, 3.5),  # (1 * (1, 2) + 3 * (5, 6) + 4 * (1, 2)) / 8
            7: (8.5, 3.5),  # (1 * (3, 4) + 3 * (7, 8) + 4 * (11, 0)) / 8
        },
    )


def test_a_block_nobody_trained_keeps_its_value() -> None:
    new = per_block_weighted_mean(CURRENT, [DEPTH_2, DEPTH_4])
    _assert_state(
        new,
        {
            2: (2, -2),
            3: (3, -3),
            4: (2, 0),
            5: (4, 4),
            6: (4, 5),  # (1 * (1, 2) + 3 * (5, 6)) / 4
            7: (6, 7),  # (1 * (3, 4) + 3 * (7, 8)) / 4
        },
    )
    assert new[_key(2)] is not CURRENT[_key(2)]  # a copy, not the caller's tensor


def test_an_update_key_outside_the_arrays_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"blocks\.1\.mlp"):
        per_block_weighted_mean(CURRENT, [({_key(1): _t(0, 0)}, 1)])


def test_block_of_parses_the_original_block_index() -> None:
    assert block_of("blocks.28.self_attn.q_proj.lora_B") == 28
    for bad in ("layers.2.q.lora_A", "blocks.x.q.lora_A", "blocks.2"):
        with pytest.raises(ValueError, match="not a LoRA name"):
            block_of(bad)


# --- the strategy on real Flower messages ----------------------------------------------------


class FakeGrid:
    """The two Grid calls the strategy makes; budget queries answered from a table."""

    def __init__(self, budgets: dict[int, float | list[float] | None]) -> None:
        self.budgets = budgets
        self.queried: list[int] = []

    def get_node_ids(self) -> Iterable[int]:
        return list(self.budgets)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None) -> list:
        replies = []
        for message in messages:
            if message.metadata.message_type == OFFER_QUERY:
                continue  # the model offer, unanswered: the node gets the weights anyway
            assert message.metadata.message_type == BUDGET_QUERY
            node = message.metadata.dst_node_id
            self.queried.append(node)
            budget = self.budgets[node]
            if budget is None:
                replies.append(Message(Error(code=0, reason="no query handler"), reply_to=message))
            elif isinstance(budget, list):  # what budget_reply never sends
                record = MetricRecord({BUDGET_KEY: budget})
                replies.append(Message(RecordDict({BUDGET_RECORD: record}), reply_to=message))
            else:
                replies.append(budget_reply(message, budget))
        return replies


@pytest.fixture
def models() -> FedBiOTModels:
    return tiny_fedbiot_models()


def _sampling(nodes: int) -> dict[str, float | int]:
    return {"min_train_nodes": nodes, "min_available_nodes": nodes, "fraction_evaluate": 0.0}


def _train_reply(message: Message, shift: float, examples: int) -> Message:
    """What a client of the message's depth returns: its top blocks' LoRA, shifted."""
    depth = int(message.content["config"][DEPTH_KEY])
    sent = from_record(message.content["arrays"])
    blocks = REGION[-depth:]
    state = {k: v + shift for k, v in sent.items() if block_of(k) in blocks}
    metrics = MetricRecord({"train_loss": shift, "num-examples": examples})
    return Message(RecordDict({"arrays": to_record(state), "metrics": metrics}), reply_to=message)


# node -> (depth, shift of its returned LoRA, examples)
PLAN = {1: (2, 1.0, 10), 2: (4, 2.0, 30), 3: (6, 4.0, 60)}


def _expected_shift(block: int) -> float:
    """The aggregate's shift of a block: the example-weighted mean over its trainers."""
    trainers = [(s, n) for d, s, n in PLAN.values() if block in REGION[-d:]]
    return sum(s * n for s, n in trainers) / sum(n for _, n in trainers)


def test_each_node_gets_its_depth_and_the_whole_region_and_blocks_are_averaged(
    models: FedBiOTModels,
) -> None:
    strategy = HeterogeneousDepthFedAvg(
        node_depths={n: d for n, (d, _, _) in PLAN.items()}, **_sampling(3)
    )
    arrays = to_record(models.adapter_state())
    grid = FakeGrid(dict.fromkeys(PLAN))
    messages = list(strategy.configure_train(1, arrays, ConfigRecord({"lr": 0.1}), grid))

    assert grid.queried == []  # every depth was known
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2, 3]
    for message in messages:
        config = message.content["config"]
        assert config[DEPTH_KEY] == PLAN[message.metadata.dst_node_id][0]
        assert config["lr"] == 0.1 and config["server-round"] == 1
        assert set(message.content["arrays"]) == set(arrays)  # frozen region blocks need it
    replies = [_train_reply(m, *PLAN[m.metadata.dst_node_id][1:]) for m in messages]
    kept, rejected = strategy.screen_train_replies(replies, arrays, 10.0)
    assert len(kept) == 3 and rejected == []

    new, metrics = strategy.aggregate_train(1, replies)

    assert new is not None and metrics is not None and set(new) == set(arrays)
    # Blocks 2-3: node 3 only (shift 4); 4-5: nodes 2, 3 ((30*2 + 60*4) / 90);
    # 6-7: all ((10*1 + 30*2 + 60*4) / 100).
    assert [_expected_shift(b) for b in REGION] == pytest.approx([4, 4, 10 / 3, 10 / 3, 3.1, 3.1])
    for name in arrays:
        expected = arrays[name].numpy() + _expected_shift(block_of(name))
        np.testing.assert_allclose(new[name].numpy(), expected, rtol=1e-6, atol=1e-6)
    assert metrics["train_loss"] == pytest.approx((10 * 1 + 30 * 2 + 60 * 4) / 100)
    assert (
        metrics["clients_depth_2"] == metrics["clients_depth_4"] == metrics["clients_depth_6"] == 1
    )
    assert {r["node"]: r["depth"] for r in strategy.history.rows(1)} == {1: 2, 2: 4, 3: 6}


def test_a_client_takes_the_top_blocks_of_its_depth_and_refuses_a_bad_one() -> None:
    """The depth crosses from the server: 0, -1 or more than the region's blocks would
    slice other blocks than asked (0 all of them, -1 all but the first)."""
    region = [24, 25, 26, 27, 28, 29]
    assert depth_blocks(ConfigRecord({DEPTH_KEY: 2}), region) == [28, 29]
    assert depth_blocks(ConfigRecord(), region) == region
    for bad in (0, -1, 7, 2.0, True, "2"):
        with pytest.raises(ValueError, match=f"train message adapter-depth={bad!r}: must be"):
            depth_blocks(ConfigRecord({DEPTH_KEY: bad}), region)


def test_unknown_nodes_are_asked_for_their_budget(models: FedBiOTModels) -> None:
    strategy = HeterogeneousDepthFedAvg(
        depth_gb={2: 1.0, 4: 2.0, 6: 3.0}, node_depths={1: 2}, **_sampling(4)
    )
    arrays = to_record(models.adapter_state())
    grid = FakeGrid({1: 99.0, 2: 2.5, 3: 3.0, 4: None})  # node 4 does not answer

    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), grid))

    assert sorted(grid.queried) == [2, 3, 4]  # node 1's depth was known
    depths = {m.metadata.dst_node_id: m.content["config"][DEPTH_KEY] for m in messages}
    assert depths == {1: 2, 2: 4, 3: 6}  # node 4 sits the round out
    assert strategy.node_depths == {1: 2, 2: 4, 3: 6}


def test_a_node_without_a_usable_budget_sits_the_round_out(models: FedBiOTModels) -> None:
    """A budget below the shallowest depth, or one that is no positive finite number of GB
    (a node's reply crosses a boundary), leaves that node out of the round, named in the
    log; the others train, and the node is asked again when next sampled."""
    strategy = HeterogeneousDepthFedAvg(depth_gb={2: 1.0, 4: 2.0}, **_sampling(6))
    grid = FakeGrid({1: 4.0, 2: 0.5, 3: float("nan"), 4: -1.0, 5: [4.0], 6: 1.5})
    with caplog_records() as records:
        messages = strategy.configure_train(
            1, to_record(models.adapter_state()), ConfigRecord(), grid
        )
    depths = {m.metadata.dst_node_id: m.content["config"][DEPTH_KEY] for m in messages}
    assert depths == {1: 4, 6: 2}
    for node, reason in [
        (2, r"client 2: memory budget 0\.5 GB is below the 1 GB the shallowest adapter depth 2"),
        (3, r"its reply's memory-budget-gb: nan must be a positive number of GB"),
        (4, r"its reply's memory-budget-gb: -1\.0 must be a positive number of GB"),
        (5, r"its reply's memory-budget-gb: \[4\.0\] is not a number of GB"),
    ]:
        assert any(re.search(f"Node {node} sits this round out: .*{reason}", r) for r in records)
    assert strategy.sat_out == [2, 3, 4, 5]  # counted in the round's clients_sat_out
    grid.queried.clear()
    strategy.configure_train(2, to_record(models.adapter_state()), ConfigRecord(), grid)
    assert sorted(grid.queried) == [2, 3, 4, 5]
    # With no node able to train, the round cannot happen: one error names them all.
    alone = HeterogeneousDepthFedAvg(depth_gb={2: 1.0}, **_sampling(2))
    with pytest.raises(RuntimeError, match=r"every sampled node sits out .*\(nodes \[1, 2\]"):
        alone.configure_train(1, to_record(models.adapter_state()), ConfigRecord(),
                              FakeGrid({1: 0.5, 2: float("nan")}))  # fmt: skip


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (lambda s: {k: v for k, v in s.items() if not k.endswith("lora_B")}, "incomplete blocks"),
        (lambda s: {**s, _key(2): torch.zeros(4, 64)}, "outside its assigned blocks"),
        (lambda s: {k: v * float("nan") for k, v in s.items()}, "NaN or Inf"),
        (lambda s: {k: v + 1e4 for k, v in s.items()}, "update norm"),
    ],
)
def test_fedbialign_composes_with_the_fedbiot_mixin(models: FedBiOTModels, corrupt, reason) -> None:
    strategy = FedBiAlign(
        models=models,
        distiller=None,
        distill_steps=0,
        node_depths={1: 2, 2: 4, 3: 6, 4: 2},
        max_norm_ratio=10.0,
        **_sampling(4),
    )
    arrays = to_record(models.adapter_state())
    messages = list(
        strategy.configure_train(1, arrays, ConfigRecord(), FakeGrid({1: 0, 2: 0, 3: 0, 4: 0}))
    )
    assert all("emulator" in m.content and "base" in m.content for m in messages)
    by_node = {m.metadata.dst_node_id: m for m in messages}
    assert {n: int(m.content["config"][DEPTH_KEY]) for n, m in by_node.items()} == {
        1: 2,
        2: 4,
        3: 6,
        4: 2,
    }
    replies = [_train_reply(by_node[n], *PLAN[n][1:]) for n in PLAN]
    bad = _train_reply(by_node[4], 1.5, 10)
    state = corrupt(from_record(bad.content["arrays"]))
    bad.content["arrays"] = to_record(state)

    new, _ = strategy.aggregate_train(1, [*replies, bad])

    assert new is not None
    round_metrics = strategy.round_metrics[1]
    assert round_metrics["clients_rejected"] == 1 and round_metrics["clients_depth_2"] == 1
    for name, value in models.adapter_state().items():  # installed in the server's models
        expected = arrays[name].numpy() + _expected_shift(block_of(name))
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-6, atol=1e-6)
    assert "update_cosine_mean" in round_metrics


# --- depth from budgets, and parsing ---------------------------------------------------------
