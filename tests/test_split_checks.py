"""Split learning's server checks every client reply before its part runs it: a step reply
that is not one batch of the model's width (or a final reply that is not the client LoRA as
sent) is refused with the reason instead of ending the run in the server's forward pass or
skewing the average. The good replies are what the ClientApp packs (``pack_forward``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from federation.messages import ACTIVATIONS
from federation.run_config import RunConfig
from models.blocks import get_blocks
from models.fedbiot_models import FedBiOTModels
from models.layout import full_layout
from models.lora import LoraSpec
from models.split_model import pack_forward
from models.wire import from_record, to_record
from server_app.exchange_loop import round_config
from server_app.split_checks import forward_problem, screen_finals
from server_app.split_learning import SplitServer, _split_round
from tests.test_aggregation import caplog_records
from tests.tiny import tiny

HIDDEN, VOCAB, WIRE = 64, 100, "fp16"


@pytest.fixture(autouse=True)
def _server_identity() -> None:
    """The identity a ServerApp process has; Flower needs it to build messages."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


def _message(node: int, **records: object) -> Message:
    sent = Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=node)
    metrics = MetricRecord({"client_seconds": 0.1, "num-examples": 4})
    return Message(RecordDict({**records, "metrics": metrics}), reply_to=sent)


def _step(change: Callable[[dict, dict], None] = lambda arrays, meta: None) -> Message:
    """A client's step reply: 2 texts of 5 tokens, labels -100 on the prompt."""
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 5, HIDDEN, generator=generator)
    labels = torch.tensor([[-100, -100, 3, 4, 99], [-100, 7, 8, -100, -100]])
    arrays, meta = pack_forward(hidden, torch.ones(2, 5, dtype=torch.long), labels, WIRE)
    change(arrays, meta)
    return _message(
        1,
        **{
            ACTIVATIONS: ArrayRecord(
                {k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}
            ),
            f"{ACTIVATIONS}-meta": ConfigRecord(meta),
        },
    )


def _set(name: str, value: object) -> Callable[[dict, dict], None]:
    """Replace one array (or, for other names, one meta entry) of the packed step."""

    def change(arrays: dict, meta: dict) -> None:
        (arrays if name in ("hidden", "labels", "attention_mask") else meta)[name] = value

    return change


STEP_CASES = {
    "hidden of another width": (
        _set("hidden", np.zeros((2, 5, HIDDEN + 1), np.float16)),
        "expected [batch, tokens, 64]",
    ),
    "labels of another length": (_set("labels", np.zeros((2, 4), np.int32)), "labels int32[2, 4]"),
    "float labels": (_set("labels", np.zeros((2, 5), np.float32)), "labels float32[2, 5]"),
    "a label past the vocabulary": (
        _set("labels", np.full((2, 5), VOCAB, np.int32)),
        "labels outside [0, 100) other than -100",
    ),
    "a mask value of 2": (
        _set("attention_mask", np.full((2, 5), 2, np.uint8)),
        "values other than 0 and 1",
    ),
    "another wire dtype": (_set("dtype", "fp32"), "the run's split-dtype is 'fp16'"),
    "a scale beyond float64": (_set("scale_exp", 5000), "scale_exp=5000 is not an integer"),
    "Inf hidden states": (
        _set("hidden", np.full((2, 5, HIDDEN), np.inf, np.float16)),
        "activations hold NaN or Inf",
    ),
}


@pytest.mark.parametrize("case", sorted(STEP_CASES))
def test_a_bad_step_reply_is_refused_with_its_reason(case: str) -> None:
    assert forward_problem(_step(), HIDDEN, VOCAB, WIRE) is None  # the ClientApp's passes
    change, reason = STEP_CASES[case]
    problem = forward_problem(_step(change), HIDDEN, VOCAB, WIRE)
    assert problem is not None and reason in problem


def test_a_step_reply_without_its_activations_is_refused() -> None:
    assert "no 'activations' record" in str(forward_problem(_message(1), HIDDEN, VOCAB, WIRE))


def test_final_replies_must_be_the_client_lora_as_sent() -> None:
    """One final reply drops a key (it used to be averaged with weights not summing to
    one), one carries its activations too (an extra record made the average raise), one is
    float64; the two honest ones are kept."""
    sent = {"a": torch.zeros(4, 2), "b": torch.ones(3)}
    honest = [{k: v + 0.1 * (i + 1) for k, v in sent.items()} for i in range(2)]
    finals = [
        _message(1, arrays=to_record(honest[0])),
        _message(2, arrays=to_record(honest[1])),
        _message(3, arrays=to_record({"a": honest[0]["a"]})),
        _message(4, arrays=to_record(honest[0]), **{ACTIVATIONS: to_record(honest[0])}),
        _message(5, arrays=to_record({k: v.double() for k, v in honest[0].items()})),
    ]
    kept, rejected = screen_finals(finals, to_record(sent), max_norm_ratio=10.0, max_update_norm=0)
    assert [r.metadata.src_node_id for r in kept] == [1, 2]
    reasons = {r.node: r.reason for r in rejected}
    assert "missing keys ['b']" in reasons[3]
    assert reasons[4] == "ArrayRecords ['activations', 'arrays']"
    assert "dtype float64, expected float32" in reasons[5]


def test_a_split_round_drops_a_bad_node_and_averages_the_others(tmp_path: Path) -> None:
    """The round loop on the real server part (tiny model): node 2's first step carries a
    label past the vocabulary, so it gets no further message and is counted as failed;
    node 3's final LoRA misses a key, so only node 1's is loaded. The transport is a
    function answering each step as a ClientApp would."""
    model, tokenizer = tiny("tiny-llama")
    spec = LoraSpec(r=4, alpha=8)
    models = FedBiOTModels(model, tokenizer, full_layout(len(get_blocks(model))), spec)
    config = RunConfig(local_steps=2, split_point=1, split_dtype=WIRE)
    server = SplitServer(models, 1, config, tmp_path / "steps.csv")
    sent_lora = to_record(models.full.state(range(1)))
    vocab, width = int(model.config.vocab_size), int(model.config.hidden_size)
    trained = {k: v + 0.01 for k, v in from_record(sent_lora).items()}
    asked: dict[int, list[int]] = {}

    def send(server_round: int, bodies: dict, step: int = 0) -> tuple[dict, list]:
        replies = {}
        for node, body in bodies.items():
            asked.setdefault(node, []).append(step)
            if bool(body["config"]["final"]):
                lora = trained if node == 1 else dict(list(trained.items())[1:])
                replies[node] = _message(node, arrays=to_record(lora))
                continue
            labels = torch.full((2, 5), vocab if node == 2 else 3)
            hidden = torch.randn(2, 5, width, generator=torch.Generator().manual_seed(step))
            arrays, meta = pack_forward(hidden, None, labels, WIRE)
            records = {k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()}
            replies[node] = _message(
                node,
                **{ACTIVATIONS: ArrayRecord(records), f"{ACTIVATIONS}-meta": ConfigRecord(meta)},
            )
        return replies, []

    with caplog_records() as records:
        metrics = _split_round(1, send, server, [1, 2, 3], round_config(config, 1, "digest"))

    assert asked == {1: [0, 1, 2], 2: [0], 3: [0, 1, 2]}
    assert (metrics["clients_failed"], metrics["clients_averaged"]) == (2, 1)
    assert any("dropped node 2: labels outside [0, " in r for r in records), records
    assert any("node 3: missing keys" in r for r in records), records
    for name, value in models.full.state(range(1)).items():
        torch.testing.assert_close(value, trained[name])
