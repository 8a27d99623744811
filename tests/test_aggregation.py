"""Server aggregation of adapter LoRA: the example-weighted mean (FedBiOT Eq. 11)."""

import itertools

import numpy as np
import pytest
import torch
from flwr.app import Error, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from models.blocks import get_blocks
from models.distillation import EmulatorDistiller
from models.fedbiot_models import FedBiOTModels
from models.layout import fedbiot_layout
from models.lora import LoraSpec
from models.wire import to_record
from strategies.fedbiot import FedBiOT
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


def test_a_failed_client_is_left_out_and_sent_the_weights_again(strategy: FedBiOT) -> None:
    template = strategy.models.adapter_state()
    good = _reply(1, template, 5, 1.0)
    sent = Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=2)

    failed = Message(Error(code=0, reason="out of memory"), reply_to=sent)
    strategy.served_nodes.update({1, 2})
    arrays, _ = strategy.aggregate_train(1, [good, failed])
    assert arrays is not None
    assert strategy.served_nodes == {1}
    assert strategy.round_metrics[1]["clients_failed"] == 1
