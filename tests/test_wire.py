"""bf16 tensors on the wire: raw 2-byte words (half of float32), decoded bit-exactly, and
hostile arrays refused naming them; end to end through FedBiOT's frozen package to a node."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import Array, ArrayRecord

from client_app.model_cache import load_client_model, store_package
from models.blocks import get_blocks
from models.fedbiot_models import FedBiOTModels
from models.layout import fedbiot_layout
from models.loading import load_model
from models.lora import LoraSpec
from models.wire import BF16_STYPE, from_record, record_bytes, state_digest, to_record
from server_app.checkpoint import from_plain, to_plain
from strategies.reply_checks import array_problem


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.int16)


def _state(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(64, 48, generator=generator).to(dtype),
        "wt": torch.randn(48, 64, generator=generator).to(dtype).t(),  # not contiguous
        "scalar": torch.tensor(-3.5, dtype=dtype),
        "empty": torch.zeros(0, 7, dtype=dtype),
    }


def test_bf16_round_trip_is_bit_exact_at_half_the_float32_bytes() -> None:
    state = _state(torch.bfloat16)
    record = to_record(state)
    assert {a.stype for a in record.values()} == {BF16_STYPE}
    back = from_record(record)
    for name, tensor in state.items():
        assert back[name].dtype == torch.bfloat16 and back[name].shape == tensor.shape, name
        assert torch.equal(_bits(back[name]), _bits(tensor)), name
    assert state_digest(back) == state_digest(state)
    ratio = record_bytes(record) / record_bytes(to_record(_state(torch.float32)))
    assert 0.45 < ratio < 0.55, ratio
    # Every other dtype still travels as NumPy.
    assert to_record({"x": torch.ones(2, dtype=torch.float16)})["x"].stype == "numpy.ndarray"


def _raw(name: str, **fields: object) -> ArrayRecord:
    header = {"dtype": "bfloat16", "shape": (2, 3), "stype": BF16_STYPE, "data": bytes(12)}
    return ArrayRecord({name: Array(**{**header, **fields})})


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"data": bytes(11)}, "11 bytes for bfloat16\\[2, 3\\], expected 12"),
        ({"data": bytes(14)}, "14 bytes"),
        ({"shape": (3, -2), "data": b""}, r"shape \(3, -2\) is not non-negative integers"),
        ({"stype": "torch.float8.raw"}, "unknown stype 'torch.float8.raw'"),
        ({"dtype": "float16"}, "stype 'torch.bfloat16.raw' with dtype 'float16'"),
    ],
)
def test_hostile_raw_arrays_are_refused_naming_the_array(fields: dict, why: str) -> None:
    with pytest.raises(ValueError, match=f"array 'blocks.3.w': {why}"):
        from_record(_raw("blocks.3.w", **fields))


def test_non_finite_bf16_is_refused_and_strategies_reject_raw_replies() -> None:
    record = to_record({"x": torch.tensor([1.0, float("inf")], dtype=torch.bfloat16)})
    with pytest.raises(ValueError, match="'x' holds NaN or Inf"):
        from_record(record)
    # Client replies are float32 LoRA; a raw array in one is dropped by the reply checks.
    assert "bytes do not decode" in array_problem("x", record["x"])


def test_checkpoints_keep_bf16_arrays() -> None:
    state = _state(torch.bfloat16)
    back = from_record(from_plain(to_plain(to_record(state))))
    assert all(torch.equal(_bits(back[k]), _bits(v)) for k, v in state.items())


def _frozen_pair(dtype: torch.dtype) -> FedBiOTModels:
    torch.manual_seed(0)
    model, tokenizer = load_model("tiny-llama", dtype)
    layout = fedbiot_layout(len(get_blocks(model)), 2, 0.5)
    return FedBiOTModels(model, tokenizer, layout, LoraSpec(r=4, alpha=8, dropout=0.0))


def test_bf16_frozen_package_is_half_size_and_a_node_loads_it_bit_exactly(
    tmp_path: Path,
) -> None:
    pair = _frozen_pair(torch.bfloat16)
    fp32 = _frozen_pair(torch.float32)
    ratio = pair.frozen.count_bytes() / fp32.frozen.count_bytes()
    assert 0.45 < ratio < 0.55, ratio
    sent = from_record(pair.frozen)
    assert all(t.dtype == torch.bfloat16 for t in sent.values())
    assert pair.frozen_digest != fp32.frozen_digest  # the digest is of the bf16 tensors
    store_package(tmp_path, pair.frozen, pair.model_package())
    # load_client_model checks the stored copy against the digest the server names.
    client = load_client_model(
        tmp_path, pair.frozen_digest, pair.compressed.spec, dtype=torch.bfloat16
    )
    loaded = {
        k.replace(".base_layer", ""): v
        for k, v in client.lora.peft.get_base_model().state_dict().items()
        if "lora_" not in k
    }
    assert sent.keys() <= loaded.keys()
    for name, tensor in sent.items():
        assert loaded[name].dtype == torch.bfloat16, name
        assert torch.equal(_bits(loaded[name]), _bits(tensor)), name
