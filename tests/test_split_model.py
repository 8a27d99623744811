"""Split learning: same loss and LoRA gradients as the unsplit model; activation codec."""

import numpy as np
import pytest
import torch

from models.blocks import get_blocks
from models.lora import LoraModel, LoraSpec
from models.response_logits import response_lm_loss
from models.split_model import (
    activation_bytes,
    pack_activations,
    pack_forward,
    payload_bytes,
    split_model,
    unpack_activations,
    unpack_forward,
)
from tests.tiny import TINY, chat_batch, tiny


def _lora(name: str, dropout: float = 0.0) -> tuple[LoraModel, dict[str, torch.Tensor]]:
    """LoRA on every block with random B (zero B would leave A without gradient)."""
    model, tokenizer = tiny(name)
    n = len(get_blocks(model))
    lora = LoraModel(model, tuple(range(n)), range(n), LoraSpec(r=4, alpha=8, dropout=dropout))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in lora.modules.values():
            module.lora_b.copy_(torch.randn(module.lora_b.shape, generator=generator) * 0.05)
    batch = chat_batch(tokenizer, n=3, length=20)
    batch["attention_mask"][1, 15:] = 0  # right padding, as task_data.formatting.collate pads
    batch["input_ids"][1, 15:] = tokenizer.pad_token_id
    batch["labels"][1, 15:] = -100
    batch["attention_mask"][2, :4] = 0  # left padding: only the mask hides it from the rest
    batch["input_ids"][2, :4] = tokenizer.pad_token_id
    return lora, batch


def _grads(lora: LoraModel, blocks: range | None = None) -> dict[str, torch.Tensor]:
    """Take (and clear) the gradients of the LoRA of ``blocks`` (all by default)."""
    out = {}
    for name, p in lora.params(blocks).items():
        assert p.grad is not None, name
        out[name] = p.grad.clone()
        p.grad = None
    return out


def _split_step(
    lora: LoraModel, batch: dict[str, torch.Tensor], k: int, dtype: str
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One split step through the wire codec, as client and server would run it."""
    client, server = split_model(lora, k)
    hidden = client.forward(batch)
    arrays, meta = pack_forward(hidden, batch["attention_mask"], batch["labels"], dtype)
    loss, grad = server.step(*unpack_forward(arrays, meta))
    grad_array, grad_meta = pack_activations(grad, dtype)
    client.backward(hidden, unpack_activations(grad_array, grad_meta))
    return loss, _grads(lora)


Reference = tuple[LoraModel, dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]


@pytest.fixture(scope="module", params=TINY)
def reference(request: pytest.FixtureRequest) -> Reference:
    """A model (no dropout), its batch, and the unsplit loss and LoRA gradients on it."""
    lora, batch = _lora(request.param)
    lora.peft.eval()
    loss = response_lm_loss(lora.peft, batch)
    loss.backward()
    return lora, batch, loss.detach(), _grads(lora)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16-as-fp16"])
@pytest.mark.parametrize("at_end", [False, True])
def test_split_step_matches_unsplit_training(
    reference: Reference, at_end: bool, dtype: str
) -> None:
    lora, batch, reference_loss, reference_grads = reference
    n = len(get_blocks(lora.peft.get_base_model()))
    k = n - 1 if at_end else 1

    loss, grads = _split_step(lora, batch, k, dtype)

    assert grads.keys() == reference_grads.keys()
    assert any(name.startswith("blocks.0.") for name in grads)  # client side covered
    assert any(name.startswith(f"blocks.{n - 1}.") for name in grads)  # server side covered
    if dtype == "fp32":
        torch.testing.assert_close(loss, reference_loss, atol=1e-5, rtol=0)
        for key, value in reference_grads.items():
            torch.testing.assert_close(grads[key], value, atol=1e-5, rtol=1e-4, msg=key)
    else:
        tolerance = 5e-3 if dtype == "fp16" else 3e-2  # bf16 keeps 8 bits of mantissa
        torch.testing.assert_close(loss, reference_loss, atol=1e-3, rtol=0)
        for key, value in reference_grads.items():
            error = (grads[key] - value).norm() / value.norm()
            assert error < tolerance, (key, float(error))


@pytest.mark.parametrize("name", TINY)
def test_recomputed_backward_equals_kept_graph_with_dropout(name: str) -> None:
    lora, batch = _lora(name, dropout=0.1)
    lora.peft.train()  # GPT-2's own dropouts and LoRA dropout are active
    client, server = split_model(lora, 2)
    hidden = client.forward(batch, seed=11)
    _, grad = server.step(hidden, batch["attention_mask"], batch["labels"])
    client.backward(hidden, grad)
    kept = _grads(lora, range(2))
    lora.peft.zero_grad()

    torch.manual_seed(12345)  # a different global RNG state must not matter
    client.recompute_backward(batch, grad, seed=11)
    recomputed = _grads(lora, range(2))
    assert recomputed.keys() == kept.keys()
    for key, value in kept.items():
        assert torch.equal(recomputed[key], value), key

    client.recompute_backward(batch, grad, seed=12)  # other masks, other gradients
    assert any(not torch.equal(g, kept[k]) for k, g in _grads(lora, range(2)).items())


def test_parts_train_their_own_lora_and_reject_bad_split_points() -> None:
    lora, _ = _lora("tiny-llama")
    n = len(get_blocks(lora.peft.get_base_model()))
    client, server = split_model(lora, 3)
    assert {id(p) for p in client.trainable()} == {id(p) for p in lora.params(range(3)).values()}
    assert {id(p) for p in server.trainable()} == {id(p) for p in lora.params(range(3, n)).values()}
    for k in (0, n):
        with pytest.raises(ValueError, match="split point"):
            split_model(lora, k)


def test_activation_codec_round_trips_and_counts_bytes() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, generator=generator) * 3

    exact, meta = pack_activations(x, "fp32")
    assert torch.equal(unpack_activations(exact, meta), x)
    assert activation_bytes(exact) == x.numel() * 4

    half, meta = pack_activations(x, "fp16")
    assert half.dtype == np.float16 and activation_bytes(half) == x.numel() * 2
    torch.testing.assert_close(unpack_activations(half, meta), x, rtol=1e-3, atol=0)

    # bf16 range and bits: huge and tiny values survive exactly as bfloat16
    wide = torch.cat([x.flatten(), torch.tensor([3e30, -2e-30, 0.0, 1e-38])])
    bits, meta = pack_activations(wide, "bf16-as-fp16")
    assert bits.dtype == np.float16 and activation_bytes(bits) == wide.numel() * 2
    back = unpack_activations(bits, meta, dtype=torch.bfloat16)
    assert torch.equal(back.view(torch.int16), wide.to(torch.bfloat16).view(torch.int16))

    with pytest.raises(ValueError, match="does not match"):
        unpack_activations(exact, {"dtype": "fp16", "scale_exp": 0})
    with pytest.raises(ValueError, match="NaN or Inf"):
        unpack_activations(*pack_activations(torch.tensor([1.0, float("nan")]), "fp32"))


@pytest.mark.parametrize("magnitude", [1e-9, 1e6])
def test_fp16_scaling_keeps_tiny_gradients_and_large_activations(magnitude: float) -> None:
    x = torch.randn(64, generator=torch.Generator().manual_seed(1)) * magnitude
    assert not torch.allclose(x.half().float(), x, rtol=1e-2, atol=0)  # plain fp16 fails here
    array, meta = pack_activations(x, "fp16")
    torch.testing.assert_close(unpack_activations(array, meta), x, rtol=1e-3, atol=0)


def test_forward_message_bytes() -> None:
    hidden = torch.zeros(3, 20, 64)
    mask = torch.ones(3, 20, dtype=torch.long)
    labels = torch.full((3, 20), -100)
    arrays, meta = pack_forward(hidden, mask, labels, "fp16")
    assert payload_bytes(arrays) == 3 * 20 * 64 * 2 + 3 * 20 * 1 + 3 * 20 * 4
    _, back_mask, back_labels = unpack_forward(arrays, meta)
    assert back_mask is not None and torch.equal(back_mask.long(), mask)
    assert torch.equal(back_labels, labels)
