"""The proximal term on effective weights: value and gradient against autograd."""

import itertools

import torch

from federation.local_training import train_lora
from federation.proximal import EffectiveWeightProximal
from models.blocks import get_blocks
from models.layout import fedbiot_layout
from models.lora import LoraModel, LoraSpec
from tests.tiny import chat_batch, tiny


def _lora_model(name: str = "tiny-llama") -> tuple[LoraModel, tuple[int, ...]]:
    model, _tokenizer = tiny(name)
    n = len(get_blocks(model))
    layout = fedbiot_layout(n, 2, 0.0)
    lora = LoraModel(model, tuple(range(n)), range(n), LoraSpec(r=4, alpha=8, dropout=0.0))
    return lora, layout.adapter_blocks


def _perturb(lora: LoraModel, blocks, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.params(blocks).values():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))


def test_penalty_and_gradient_match_the_effective_weight_definition() -> None:
    lora, adapter = _lora_model()
    _perturb(lora, adapter, seed=1)
    modules = lora.modules_of(adapter)
    # Round-start effective weights, W_hat_t = W0 + s * B_t A_t, built by hand.
    w0 = [m.layer.base_layer.weight.detach() for m in modules]
    anchors = [
        (w + m.scaling * m.lora_b.detach() @ m.lora_a.detach())
        for w, m in zip(w0, modules, strict=False)
    ]
    prox = EffectiveWeightProximal(modules, epsilon=0.3)
    _perturb(lora, adapter, seed=2)
    params = list(itertools.chain.from_iterable((m.lora_a, m.lora_b) for m in modules))
    for p in params:
        p.requires_grad_(True)

    ours = prox.penalty()
    grads = torch.autograd.grad(ours, params)

    reference = (
        0.5
        * 0.3
        * sum(
            ((w + m.scaling * m.lora_b @ m.lora_a) - anchor).pow(2).sum()
            for w, m, anchor in zip(w0, modules, anchors, strict=False)
        )
    )
    expected = torch.autograd.grad(reference, params)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)
    assert ours.item() > 0
    for got, want in zip(grads, expected, strict=False):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    # Closed form for A: dP/dA = eps * s * B^T (W_hat - W_hat_t).
    m, anchor, w = modules[0], anchors[0], w0[0]
    delta = (w + m.scaling * m.lora_b @ m.lora_a) - anchor
    torch.testing.assert_close(grads[0], 0.3 * m.scaling * m.lora_b.T @ delta, rtol=1e-4, atol=1e-7)


def test_penalty_is_zero_at_the_anchor_and_has_a_gradient_away_from_it() -> None:
    lora, adapter = _lora_model()
    _perturb(lora, adapter, seed=3)
    prox = EffectiveWeightProximal(lora.modules_of(adapter), epsilon=1.0)
    assert abs(prox.penalty().item()) < 1e-6
    _perturb(lora, adapter, seed=4)
    params = lora.train_only(adapter)
    prox.penalty().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_client_training_changes_only_adapter_lora() -> None:
    lora, adapter = _lora_model("tiny-gpt2")
    _, tokenizer = tiny("tiny-gpt2")
    _perturb(lora, None, seed=5)  # non-zero B everywhere so every LoRA has a gradient path
    before = {k: v.detach().clone() for k, v in lora.peft.state_dict().items()}
    batch = chat_batch(tokenizer)
    result = train_lora(
        lora, adapter, iter(itertools.repeat(batch)), steps=3, learning_rate=1e-2, prox_epsilon=0.1
    )
    assert result.tokens == 3 * batch["attention_mask"].numel()
    assert result.prox > 0
    after = lora.peft.state_dict()
    adapter_names = set()
    for name in lora.params(adapter):
        block, rest = name.split(".")[1], name.split(".", 2)[2]
        adapter_names.add(
            (
                block,
                rest.replace(".lora_A", ".lora_A.default.weight").replace(
                    ".lora_B", ".lora_B.default.weight"
                ),
            )
        )
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "training changed nothing"
    for key in changed:
        assert "lora_" in key, f"frozen weight {key} changed"
        assert any(f".{block}.{rest}" in key for block, rest in adapter_names), key
    assert len(changed) == len(lora.params(adapter))
