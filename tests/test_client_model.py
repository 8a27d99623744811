"""The client's copy of the compressed model, and the wire format of LoRA arrays."""

import numpy as np
import pytest
import torch

from client_app.model_cache import MissingBaseError, load_client_model, store_package
from federation.run_config import ConfigError, RunConfig
from models.blocks import get_blocks
from models.fedbiot_models import FedBiOTModels
from models.layout import fedbiot_layout
from models.lora import LoraSpec
from models.quantization import check_mode
from models.wire import from_record, record_bytes, to_record
from tests.tiny import TINY, tiny


@pytest.mark.parametrize("name", TINY)
def test_client_rebuilds_the_servers_compressed_model_exactly(name: str, tmp_path) -> None:
    model, tokenizer = tiny(name)
    layout = fedbiot_layout(len(get_blocks(model)), 2, 0.5)
    spec = LoraSpec(r=4, alpha=8, dropout=0.0)
    pair = FedBiOTModels(model, tokenizer, layout, spec)
    with torch.no_grad():  # give every LoRA a non-zero B so the comparison covers it
        for p in pair.compressed.params().values():
            p.add_(0.05)
    store_package(tmp_path, pair.frozen, pair.model_package())
    client = load_client_model(tmp_path, pair.frozen_digest, spec)
    assert client.layout == layout
    sent = {**pair.adapter_state(), **pair.emulator_state()}
    client.lora.load_state(from_record(to_record(sent)))
    ids = torch.randint(5, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    pair.compressed.peft.eval()
    with torch.no_grad():
        torch.testing.assert_close(client.lora.peft(ids).logits, pair.compressed.peft(ids).logits)
    assert client.tokenizer.chat_template == tokenizer.chat_template
    with pytest.raises(MissingBaseError, match="no cached compressed model"):
        load_client_model(tmp_path, "0" * 64, spec)


def test_wire_round_trip_bytes_and_bad_values() -> None:
    state = {
        "blocks.1.q.lora_A": torch.randn(4, 8, dtype=torch.bfloat16),
        "blocks.1.q.lora_B": torch.zeros(8, 4),
    }
    record = to_record(state)
    back = from_record(record)
    assert back["blocks.1.q.lora_A"].dtype == torch.bfloat16  # raw bf16, see tests/test_wire.py
    torch.testing.assert_close(back["blocks.1.q.lora_A"], state["blocks.1.q.lora_A"])
    # Bytes counted are the serialised arrays (data and header) plus the keys.
    expected = sum(len(a.data) + len(k) for k, a in record.items())
    assert record_bytes(record) == expected
    assert expected >= 32 * 2 + 32 * 4
    bad = to_record({"x": torch.tensor([1.0, float("nan")])})
    with pytest.raises(ValueError, match="'x' holds NaN"):
        from_record(bad)
    assert np.array_equal(record["blocks.1.q.lora_B"].numpy(), np.zeros((8, 4), np.float32))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-CUDA fallback path")
def test_quantized_request_without_cuda_falls_back_to_float32_and_says_why(tmp_path) -> None:
    model, tokenizer = tiny("tiny-llama")
    layout = fedbiot_layout(len(get_blocks(model)), 2, 0.5)
    spec = LoraSpec(r=4, alpha=8, dropout=0.0)
    pair = FedBiOTModels(model, tokenizer, layout, spec)
    store_package(tmp_path, pair.frozen, pair.model_package())
    client = load_client_model(tmp_path, pair.frozen_digest, spec, "4bit")
    assert client.quantization == "none"
    assert "no CUDA device" in client.quantization_note
    assert all(p.dtype == torch.float32 for p in client.lora.peft.parameters())
    ids = torch.randint(5, 1000, (1, 8))
    assert torch.isfinite(client.lora.peft(ids).logits).all()
    with pytest.raises(ValueError, match="quantization='3bit'"):
        check_mode("3bit")
    with pytest.raises(ConfigError, match="quantization='int4'"):
        RunConfig.from_flower({"quantization": "int4"})
