"""The bad-reply corpus: every reply that used to end the ServerApp (or silently skew the
round) is dropped, logged with its node id and counted, and the round goes on with the rest.

Each case builds real Flower messages and runs the real FedBiOT strategy on the tiny model.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from io import BytesIO

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from federation.local_training import client_control_update
from federation.messages import DELTA_C
from federation.run_config import RunConfig
from models.distillation import EmulatorDistiller
from models.wire import to_record
from strategies.algorithms import strategy_class
from strategies.fedbiot import FedBiOT
from strategies.reply_checks import screen_contents
from tests import test_aggregation
from tests.test_aggregation import _reply, caplog_records
from tests.tiny import chat_batch

strategy = test_aggregation.strategy  # the fixture: FedBiOT on the tiny model
Reply = Callable[[dict[str, torch.Tensor]], Message]


def _npy(value: np.ndarray) -> bytes:
    buffer = BytesIO()
    np.save(buffer, value, allow_pickle=False)
    return buffer.getvalue()


def _with_content(state: dict[str, torch.Tensor], **records: object) -> Message:
    """A reply from node 9 with the good arrays and metrics, some records replaced."""
    content = {
        "arrays": to_record(state),
        "metrics": MetricRecord({"train_loss": 1.0, "num-examples": 10}),
        **records,
    }
    sent = Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=9)
    return Message(RecordDict({k: v for k, v in content.items() if v is not None}), reply_to=sent)


def _bad_bytes(state: dict[str, torch.Tensor]) -> Message:
    """The first Array declares its own shape but carries the bytes of a 3x3 array."""
    record = to_record(state)
    name, array = next(iter(record.items()))
    record[name] = Array(array.dtype, tuple(array.shape), array.stype, _npy(np.zeros((3, 3))))
    return _with_content(state, arrays=record)


def _garbage(state: dict[str, torch.Tensor]) -> Message:
    record = to_record(state)
    name, array = next(iter(record.items()))
    record[name] = Array(array.dtype, tuple(array.shape), array.stype, b"\x93NUMPY garbage")
    return _with_content(state, arrays=record)


def _metrics(**values: float | list[float]) -> Reply:
    return lambda s: _with_content(s, metrics=MetricRecord(values))


BAD_REPLIES: dict[str, tuple[Reply, str]] = {
    "extra metric key": (
        _metrics(train_loss=1.0, extra=2.0, **{"num-examples": 10}),
        "metric keys differ",
    ),
    "missing metric key": (_metrics(**{"num-examples": 10}), "metric keys differ"),
    "second ArrayRecord": (
        lambda s: _with_content(s, more=to_record(s)),
        "ArrayRecords ['arrays', 'more']",
    ),
    "no ArrayRecord": (lambda s: _with_content(s, arrays=None), "ArrayRecords []"),
    "num-examples NaN": (_metrics(train_loss=1.0, **{"num-examples": float("nan")}), "finite"),
    "num-examples inf": (_metrics(train_loss=1.0, **{"num-examples": float("inf")}), "finite"),
    "num-examples negative": (_metrics(train_loss=1.0, **{"num-examples": -199}), "> 0"),
    "num-examples zero": (_metrics(train_loss=1.0, **{"num-examples": 0}), "> 0"),
    "num-examples missing": (_metrics(train_loss=1.0), "no 'num-examples'"),
    "metric NaN": (_metrics(train_loss=float("nan"), **{"num-examples": 10}), "finite"),
    # Flower's MetricRecord takes lists; the strategies take each metric as one number.
    "metric list": (
        _metrics(train_loss=[1.0, 2.0], **{"num-examples": 10}),
        "train_loss=[1.0, 2.0] is not a finite number",
    ),
    "num-examples list": (
        _metrics(train_loss=1.0, **{"num-examples": [10]}),
        "num-examples=[10] is not a finite number",
    ),
    "bytes of another shape": (_bad_bytes, "bytes hold float64[3, 3]"),
    "undecodable bytes": (_garbage, "bytes do not decode"),
}


def _honest(strategy: FedBiOT, count: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    template = strategy.models.adapter_state()
    generator = torch.Generator().manual_seed(seed)
    return [
        {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in template.items()}
        for _ in range(count)
    ]


@pytest.mark.parametrize("case", sorted(BAD_REPLIES))
def test_a_bad_reply_is_dropped_and_the_round_goes_on(strategy: FedBiOT, case: str) -> None:
    make, reason = BAD_REPLIES[case]
    template = strategy.models.adapter_state()
    strategy._round_arrays = to_record(template)
    good = _honest(strategy, 2)
    bad = make({k: v + 0.01 for k, v in template.items()})
    replies = [_reply(i + 1, s, 10, 1.0) for i, s in enumerate(good)] + [bad]

    with caplog_records() as records:
        arrays, metrics = strategy.aggregate_train(1, replies)

    assert arrays is not None and metrics is not None
    assert strategy.round_metrics[1]["clients_rejected"] == 1
    for name in template:
        expected = (good[0][name].numpy() + good[1][name].numpy()) / 2
        np.testing.assert_allclose(arrays[name].numpy(), expected, rtol=1e-5, atol=1e-7)
    assert metrics["train_loss"] == pytest.approx(1.0)
    assert any("node 9" in r and reason in r for r in records), records


def test_num_examples_claims_are_capped(strategy: FedBiOT) -> None:
    """``num-examples=1e12`` used to make one client the whole global step."""
    strategy._round_arrays = to_record(strategy.models.adapter_state())
    strategy.max_examples = 100
    states = _honest(strategy, 3)
    replies = [_reply(1, states[0], 100, 1.0), _reply(2, states[1], 100, 1.0)]
    replies.append(_reply(3, states[2], 10**12, 1.0))

    with caplog_records() as records:
        arrays, _ = strategy.aggregate_train(1, replies)

    assert arrays is not None
    for name, value in arrays.items():
        expected = sum(s[name].numpy() for s in states) / 3
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5, atol=1e-7)
    assert any("Node 3 claims num-examples=1000000000000; capped" in r for r in records)


def test_three_of_five_colluding_clients_pass_the_median_screen_not_the_norm_bound(
    strategy: FedBiOT,
) -> None:
    """Three colluders at 10^4 x the honest update are the median: the ratio screen lets
    them through. ``max-update-norm`` rejects them whatever the others send."""
    template = strategy.models.adapter_state()
    strategy._round_arrays = to_record(template)
    strategy.max_norm_ratio = 10.0
    honest = _honest(strategy, 2)
    colluders = [
        {k: template[k] + 1e4 * (v - template[k]) for k, v in s.items()}
        for s in _honest(strategy, 3, 7)
    ]
    replies = [_reply(i + 1, s, 10, 1.0) for i, s in enumerate(honest + colluders)]

    screened, rejected = strategy._screen(list(replies))
    assert len(screened) == 5 and not rejected

    strategy.max_update_norm = 1.0
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None and strategy.round_metrics[1]["clients_rejected"] == 3
    for name, value in arrays.items():
        expected = (honest[0][name].numpy() + honest[1][name].numpy()) / 2
        np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_evaluation_replies_of_zero_examples_do_not_end_the_round(strategy: FedBiOT) -> None:
    """A partition of one record holds no test example: ``num-examples=0`` in client
    evaluation used to raise ZeroDivisionError after round 1."""
    replies = []
    for node, (loss, examples) in enumerate([(2.0, 0), (3.0, 4), (5.0, 0)], start=1):
        sent = Message(content=RecordDict(), message_type=MessageType.EVALUATE, dst_node_id=node)
        metrics = MetricRecord({"eval_loss": loss, "num-examples": examples})
        replies.append(Message(RecordDict({"metrics": metrics}), reply_to=sent))

    result = strategy.aggregate_evaluate(1, replies)

    assert result is not None and result["eval_loss"] == pytest.approx(3.0)
    assert strategy.round_metrics[1]["client_eval_rejected"] == 2


def test_a_round_without_any_update_stops_the_run(strategy: FedBiOT) -> None:
    """Every client failed (or every reply was rejected): the run must not go on with an
    unchanged model and end looking like a success."""
    strategy._round_arrays = to_record(strategy.models.adapter_state())
    sent = Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=4)
    failed = Message(Error(code=0, reason="UnicodeEncodeError"), reply_to=sent)
    bad = BAD_REPLIES["num-examples zero"][0](strategy.models.adapter_state())
    with pytest.raises(RuntimeError, match=r"round 1: no client update .* 1 rejected"):
        strategy.aggregate_train(1, [failed, bad])


def test_a_non_finite_emulator_stops_the_run(strategy: FedBiOT) -> None:
    """``distill-lr`` far too large turns the emulator into NaN, which every client then
    fails on and the export would save."""
    models = strategy.models
    strategy.distiller = EmulatorDistiller(
        models, itertools.repeat(chat_batch(models.tokenizer)), learning_rate=1e30, kd_lambda=1.0
    )
    strategy.distill_steps = 3
    template = models.adapter_state()
    strategy._round_arrays = to_record(template)
    with pytest.raises(FloatingPointError, match="emulator LoRA holds non-finite values"):
        strategy.aggregate_train(1, [_reply(1, template, 10, 1.0)])
    assert not all(torch.isfinite(v).all() for v in models.emulator_state().values())


def test_an_ok_reply_passes_every_check(strategy: FedBiOT) -> None:
    """The checks accept what the ClientApp sends (no extra records, float32 arrays)."""
    state = strategy.models.adapter_state()
    strategy._round_arrays = to_record(state)
    kept, rejected = strategy._screen([_reply(1, state, 3, 0.5), _with_content(state)])
    assert len(kept) == 2 and not rejected


def test_the_exchange_loops_keep_a_split_step_reply_and_drop_a_broken_one() -> None:
    """KD-FedLLM and split learning replies carry other records (activations and their
    ConfigRecord meta); only their arrays and metrics are checked there."""
    replies = []
    for node, data in ((1, None), (2, b"\x93NUMPY garbage")):
        hidden = Array(np.ones((2, 3), dtype=np.float16))
        if data is not None:
            hidden = Array(hidden.dtype, tuple(hidden.shape), hidden.stype, data)
        sent = Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=node)
        content = RecordDict(
            {
                "activations": ArrayRecord({"hidden": hidden}),
                "activations-meta": ConfigRecord({"dtype": "fp16"}),
                "metrics": MetricRecord({"client_seconds": 0.5, "num-examples": 4}),
            }
        )
        replies.append(Message(content, reply_to=sent))

    kept, rejected = screen_contents(replies, [], None)

    assert [r.metadata.src_node_id for r in kept] == [1]
    assert [r.node for r in rejected] == [2] and "do not decode" in rejected[0].reason


def test_scaffold_checks_each_control_delta_against_its_own_update(strategy: FedBiOT) -> None:
    """``delta_c_i`` is ``-c + (x - y_i) / (K eta_l)``, which the server can compute from the
    reply's own model: one that is not (here finite float32 values near the top of the
    range, which would turn ``c`` into Inf for every client) is dropped, and ``c`` moves by
    the honest deltas, computed as the ClientApp computes them."""
    steps, rate = 5, 1e-3
    cls, params = strategy_class(RunConfig(algorithm="scaffold", local_steps=steps,
                                           learning_rate=rate))  # fmt: skip
    scaffold = cls(models=strategy.models, distiller=None, distill_steps=0, **params)
    x = strategy.models.adapter_state()
    generator = torch.Generator().manual_seed(3)
    c = {k: 0.1 * torch.randn(v.shape, generator=generator) for k, v in x.items()}
    scaffold._round_arrays, scaffold.current, scaffold.control = to_record(x), x, c
    scaffold.num_nodes = 4
    replies, deltas = [], []
    for node, y in enumerate(_honest(strategy, 3, seed=5), start=1):
        c_i = {k: torch.randn(v.shape, generator=generator) for k, v in x.items()}
        _, delta = client_control_update(c, c_i, x, y, steps, rate)
        if node == 3:
            delta = {k: torch.full_like(v, 3e38) for k, v in delta.items()}
        else:
            deltas.append(delta)
        reply = _reply(node, y, 10, 1.0)
        reply.content[DELTA_C] = to_record(delta)
        replies.append(reply)

    with caplog_records() as records:
        arrays, _ = scaffold.aggregate_train(1, replies)

    assert arrays is not None and scaffold.round_metrics[1]["clients_rejected"] == 1
    assert any("node 3: scaffold-delta-c: ||delta_c_i" in r for r in records), records
    for name, value in scaffold.control.items():
        expected = c[name] + (deltas[0][name] + deltas[1][name]) / 4
        torch.testing.assert_close(value, expected)


def test_the_local_baseline_keeps_each_partition_s_model_once(strategy: FedBiOT) -> None:
    """The local-only baseline keeps (and exports) every client's model under the partition
    its reply names: a reply naming none, or one another node named this round, would lose
    a client's model or overwrite it without a word; such replies are dropped instead."""
    cls, params = strategy_class(RunConfig(method="local"), aggregates=False)
    local = cls(models=strategy.models, distiller=None, distill_steps=0, **params)
    x = strategy.models.adapter_state()
    local._round_arrays = to_record(x)
    states = _honest(strategy, 5)
    claims = {1: 0, 2: 1, 3: 0, 4: 2.5, 5: None}  # node: partition-id it names
    replies = []
    for (node, pid), state in zip(claims.items(), states, strict=True):
        metrics = {"train_loss": 1.0, "num-examples": 10, "num-partitions": 3}
        if pid is not None:
            metrics["partition-id"] = pid
        else:
            del metrics["num-partitions"]
        sent = Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=node)
        content = RecordDict({"arrays": to_record(state), "metrics": MetricRecord(metrics)})
        replies.append(Message(content, reply_to=sent))

    with caplog_records() as records:
        local.aggregate_train(1, replies)

    assert local.round_metrics[1]["clients_rejected"] == 3
    assert sorted(local.client_arrays) == [0, 1]
    for pid, state in ((0, states[0]), (1, states[1])):
        for name, value in local.client_arrays[pid].items():
            np.testing.assert_array_equal(value.numpy(), state[name].numpy())
    for node, reason in [
        (3, "partition-id=0 is node 1's this round"),
        (4, "partition-id=2.5 of num-partitions=3 is not a partition"),
        (5, "metric keys differ from the others'"),  # the others have them
    ]:
        assert any(f"node {node}: {reason}" in r for r in records), records
    # Alone (no other reply to differ from), a reply without a partition is dropped too.
    with caplog_records() as records, pytest.raises(RuntimeError, match="1 rejected"):
        local.aggregate_train(2, replies[-1:])
    assert any("node 5: no partition-id and num-partitions metrics" in r for r in records)
