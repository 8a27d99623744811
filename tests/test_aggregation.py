"""Server aggregation of adapter LoRA: the example-weighted mean (FedBiOT Eq. 11)."""

import itertools
import logging
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from models.blocks import get_blocks
from models.distillation import EmulatorDistiller
from models.fedbiot_models import FedBiOTModels
from models.layout import fedbiot_layout
from models.lora import LoraSpec
from models.wire import to_record
from strategies.fedbiot import FedBiOT
from tests.stand_in_grid import NodeDirectory
from tests.test_algorithms import NODES
from tests.tiny import chat_batch, tiny


@pytest.fixture
def strategy() -> FedBiOT:
    # The identity a ServerApp process has; Flower needs it to build messages.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    model, tokenizer = tiny("tiny-llama")
    layout = fedbiot_layout(len(get_blocks(model)), 2, 0.5)
    pair = FedBiOTModels(model, tokenizer, layout, LoraSpec(r=4, alpha=8))
    distiller = EmulatorDistiller(
        pair, itertools.repeat(chat_batch(tokenizer)), learning_rate=1e-3, kd_lambda=1.0
    )
    return FedBiOT(models=pair, distiller=distiller, distill_steps=0)


def _reply(node: int, state: dict[str, torch.Tensor], examples: int, loss: float) -> Message:
    sent = Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=node)
    metrics = MetricRecord({"train_loss": loss, "num-examples": examples})
    return Message(RecordDict({"arrays": to_record(state), "metrics": metrics}), reply_to=sent)


def test_adapter_aggregation_is_the_example_weighted_mean(strategy: FedBiOT) -> None:
    template = strategy.models.adapter_state()
    generator = torch.Generator().manual_seed(0)
    states = [
        {k: torch.randn(v.shape, generator=generator) for k, v in template.items()}
        for _ in range(3)
    ]
    examples = [10, 30, 60]
    replies = [
        _reply(i + 1, s, n, loss)
        for i, (s, n, loss) in enumerate(zip(states, examples, [1.0, 2.0, 4.0], strict=False))
    ]
    emulator_before = strategy.models.emulator_state()

    arrays, metrics = strategy.aggregate_train(1, replies)

    assert arrays is not None and metrics is not None
    for name in template:
        expected = sum(n * s[name].numpy() for s, n in zip(states, examples, strict=False)) / 100
        np.testing.assert_allclose(arrays[name].numpy(), expected, rtol=1e-6, atol=1e-7)
        # The aggregate is installed in both server models.
        np.testing.assert_allclose(
            strategy.models.compressed.params()[name].detach().numpy(),
            expected,
            rtol=1e-6,
            atol=1e-7,
        )
        np.testing.assert_allclose(
            strategy.models.full.params()[name].detach().numpy(), expected, rtol=1e-6, atol=1e-7
        )
    assert metrics["train_loss"] == pytest.approx((10 * 1 + 30 * 2 + 60 * 4) / 100)
    # No distillation steps were asked for: the emulator is untouched.
    for name, value in strategy.models.emulator_state().items():
        assert torch.equal(value, emulator_before[name])
    bytes_up = strategy.round_metrics[1]["bytes_up"]
    assert bytes_up == sum(to_record(s).count_bytes() for s in states)


def test_failed_and_silent_clients_are_left_out_and_sent_the_weights_again(
    strategy: FedBiOT,
) -> None:
    """Node 12 replies with an error, node 13 not at all (a dead node: the SuperLink's error
    reply names no source node). Both count as failed and get the frozen weights again."""
    template = strategy.models.adapter_state()
    arrays = to_record(template)
    sent = list(strategy.configure_train(1, arrays, ConfigRecord(), NodeDirectory(NODES)))
    assert all("base" in m.content for m in sent)
    to_node_12 = next(m for m in sent if m.metadata.dst_node_id == 12)
    failed = Message(Error(code=0, reason="out of memory"), reply_to=to_node_12)
    good = _reply(11, template, 5, 1.0)
    aggregated, _ = strategy.aggregate_train(1, [good, failed])
    assert aggregated is not None
    assert strategy.shipment.served == {11}
    assert strategy.round_metrics[1]["clients_failed"] == 2
    again = list(strategy.configure_train(2, aggregated, ConfigRecord(), NodeDirectory(NODES)))
    assert {m.metadata.dst_node_id for m in again if "base" in m.content} == {12, 13}


@contextmanager
def caplog_records() -> Iterator[list[str]]:
    """Messages Flower's logger emits inside the block (it does not propagate to root)."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (lambda s: {**s, next(iter(s)): s[next(iter(s))] * float("nan")}, "NaN or Inf"),
        (lambda s: dict(list(s.items())[1:]), "missing keys"),
        (lambda s: {**s, "blocks.0.extra.lora_A": torch.zeros(2)}, "unexpected keys"),
        (lambda s: {**s, next(iter(s)): torch.zeros(3, 3)}, "shape"),
        (lambda s: {**s, next(iter(s)): s[next(iter(s))].to(torch.int32)}, "dtype int32"),
        # Finite in float64, Inf once averaged into the float32 adapter.
        (lambda s: {k: v.double() * 1e39 for k, v in s.items()}, "dtype float64, expected float32"),
        (lambda s: {k: v.half() for k, v in s.items()}, "dtype float16, expected float32"),
        (lambda s: {k: v + 1e4 for k, v in s.items()}, "update norm"),
    ],
)
def test_a_bad_update_is_rejected_and_the_others_aggregated(
    strategy: FedBiOT, corrupt, reason
) -> None:
    template = strategy.models.adapter_state()
    strategy._round_arrays = to_record(template)
    strategy.max_norm_ratio = 10.0
    generator = torch.Generator().manual_seed(1)
    good = [
        {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in template.items()}
        for _ in range(3)
    ]
    bad = corrupt({k: v + 0.01 for k, v in template.items()})
    replies = [_reply(i + 1, s, 10, 1.0) for i, s in enumerate(good)] + [_reply(9, bad, 10, 1.0)]

    with caplog_records() as records:
        arrays, _ = strategy.aggregate_train(1, replies)

    assert arrays is not None and strategy.round_metrics[1]["clients_rejected"] == 1
    for name in template:
        expected = sum(s[name].numpy() for s in good) / 3
        np.testing.assert_allclose(arrays[name].numpy(), expected, rtol=1e-5, atol=1e-7)
    assert any("node 9" in r and reason in r for r in records)
