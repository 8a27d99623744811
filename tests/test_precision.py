"""Compute dtype, gradient checkpointing and gradient accumulation on a real client step.

Gradients are read with post-accumulate hooks during ``train_lora`` (before clipping and the
AdamW update), so what is compared is exactly what the client's optimizer steps on.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from client_app.dpo_training import train_dpo
from client_app.model_cache import ClientModel, load_client_model, store_package
from federation.local_training import lora_steps, train_lora
from federation.run_config import ConfigError, RunConfig
from models.blocks import get_blocks
from models.distillation import EmulatorDistiller
from models.fedbiot_models import FedBiOTModels
from models.layout import fedbiot_layout
from models.loading import load_model
from models.lora import LoraModel, LoraSpec
from models.precision import resolve_dtype, set_gradient_checkpointing
from models.response_logits import response_lm_loss
from task_data import collate
from task_data.preferences import collate_pairs


def client_model(tmp_path: Path, dtype: torch.dtype, spec: LoraSpec) -> ClientModel:
    """The client's compressed tiny Llama (adapter: top 2 blocks) as a node loads it, with
    every LoRA set to non-zero values (B = 0 would leave A without gradient)."""
    torch.manual_seed(0)
    model, tokenizer = load_model("tiny-llama", dtype)
    layout = fedbiot_layout(len(get_blocks(model)), 2, 0.5)
    pair = FedBiOTModels(model, tokenizer, layout, spec)
    store_package(tmp_path, pair.frozen, pair.model_package())
    client = load_client_model(tmp_path, pair.frozen_digest, spec, dtype=dtype)
    generator = torch.Generator().manual_seed(3)
    client.lora.load_state(
        {k: 0.1 * torch.randn(v.shape, generator=generator) for k, v in client.lora.state().items()}
    )
    return client


def examples(lengths: list[tuple[int, int]]) -> list[dict[str, list[int]]]:
    """Tokenized examples of (prompt, response) lengths: prompts carry no loss."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for prompt, response in lengths:
        ids = torch.randint(5, 1000, (prompt + response,), generator=generator).tolist()
        labels = [-100] * prompt + ids[prompt:]
        out.append({"input_ids": ids, "labels": labels, "attention_mask": [1] * len(ids)})
    return out


@contextmanager
def captured_gradients(lora: LoraModel, blocks: tuple[int, ...]) -> Iterator[dict]:
    """The LoRA gradients of ``blocks`` as the optimizer gets them; LoRA restored after."""
    start = lora.state()
    grads: dict[str, torch.Tensor] = {}
    hooks = [
        p.requires_grad_(True).register_post_accumulate_grad_hook(
            lambda p, n=name: grads.update({n: p.grad.clone()})
        )
        for name, p in lora.params(blocks).items()
    ]
    try:
        yield grads
    finally:
        for hook in hooks:
            hook.remove()
        lora.load_state(start)


def step_gradients(
    lora: LoraModel, batches: list[dict[str, torch.Tensor]], accum_steps: int = 1
) -> dict[str, torch.Tensor]:
    """The adapter's LoRA gradients of one client step (from the same starting LoRA)."""
    adapter = tuple(sorted({m.block for m in lora.modules.values()})[-2:])
    with captured_gradients(lora, adapter) as grads:
        torch.manual_seed(7)  # the same LoRA dropout masks in every call
        train_lora(lora, adapter, iter(batches), 1, 1e-3, 0.01, accum_steps=accum_steps)
    return grads


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].abs().sum() > 0, f"{name} has no gradient"
        torch.testing.assert_close(a[name], b[name], rtol=tol, atol=tol, msg=name)


def test_checkpointing_gives_the_same_gradients_recomputing_only_the_adapter(
    tmp_path: Path,
) -> None:
    client = client_model(tmp_path, torch.float32, LoraSpec(r=4, alpha=8, dropout=0.1))
    lora, base = client.lora, client.lora.peft.get_base_model()
    batch = collate(examples([(9, 14), (5, 20), (12, 6)]), 0)
    plain = step_gradients(lora, [batch])
    blocks = get_blocks(base)
    calls = [0] * len(blocks)
    hooks = [
        block.self_attn.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, block in enumerate(blocks)
    ]
    set_gradient_checkpointing(base, True)
    try:
        checkpointed = step_gradients(lora, [batch])
    finally:
        set_gradient_checkpointing(base, False)
        for hook in hooks:
            hook.remove()
    assert not base.is_activation_checkpointing
    assert_same(plain, checkpointed, 1e-6)
    # The 2 adapter blocks run again in backward; the frozen emulator below them does not.
    assert calls == [1] * (len(blocks) - 2) + [2, 2]


def test_checkpointed_distillation_gives_the_same_emulator_gradients() -> None:
    torch.manual_seed(0)
    model, tokenizer = load_model("tiny-llama")
    layout = fedbiot_layout(len(get_blocks(model)), 2, 0.5)
    pair = FedBiOTModels(model, tokenizer, layout, LoraSpec(r=4, alpha=8, dropout=0.0))
    generator = torch.Generator().manual_seed(3)
    state = pair.compressed.state()
    pair.compressed.load_state(
        {k: 0.1 * torch.randn(v.shape, generator=generator) for k, v in state.items()}
    )
    distiller = EmulatorDistiller(pair, iter([]), 1e-3, 1.0)
    batch = collate(examples([(9, 14), (5, 20)]), 0)
    student = pair.compressed.peft.get_base_model()

    def gradients() -> dict[str, torch.Tensor]:
        params = pair.compressed.params(layout.emulator_blocks)
        pair.compressed.train_only(layout.emulator_blocks)
        pair.compressed.peft.train()
        distiller.losses(batch).total.backward()
        grads = {k: p.grad.clone() for k, p in params.items()}
        for p in params.values():
            p.grad = None
        return grads

    plain = gradients()
    set_gradient_checkpointing(student, True)
    assert student.is_activation_checkpointing
    assert_same(plain, gradients(), 1e-6)


def test_two_accumulated_micro_batches_give_the_gradient_of_their_union(tmp_path: Path) -> None:
    client = client_model(tmp_path, torch.float32, LoraSpec(r=4, alpha=8, dropout=0.0))
    # Micro-batches with very different response-token counts (4 vs 40) and padding.
    parts = examples([(10, 3), (2, 1), (6, 25), (20, 15)])
    whole = step_gradients(client.lora, [collate(parts, 0)])
    accumulated = step_gradients(
        client.lora, [collate(parts[:2], 0), collate(parts[2:], 0)], accum_steps=2
    )
    assert_same(whole, accumulated, 1e-5)


def test_accumulated_dpo_step_gives_the_gradient_of_its_union(tmp_path: Path) -> None:
    client = client_model(tmp_path, torch.float32, LoraSpec(r=4, alpha=8, dropout=0.0))
    pairs = [
        {"chosen": c, "rejected": r}
        for c, r in zip(
            examples([(6, 4), (3, 9), (8, 2)]), examples([(6, 7), (3, 2), (8, 11)]), strict=True
        )
    ]
    lora, adapter = client.lora, client.layout.adapter_blocks
    # A reference unlike the policy, so the DPO loss has a gradient.
    reference = {k: v * 0.5 for k, v in lora.state().items()}

    def gradients(batches: list[dict[str, torch.Tensor]], accum: int) -> dict[str, torch.Tensor]:
        with captured_gradients(lora, adapter) as grads:
            train_dpo(
                lora, adapter, iter(batches), 1, 1e-3, reference_state=reference, accum_steps=accum
            )
        return grads

    whole = gradients([collate_pairs(pairs, 0)], 1)
    accumulated = gradients([collate_pairs(pairs[:1], 0), collate_pairs(pairs[1:], 0)], 2)
    assert_same(whole, accumulated, 1e-5)


def test_bfloat16_client_keeps_frozen_weights_bf16_and_lora_and_adam_state_fp32(
    tmp_path: Path,
) -> None:
    client = client_model(tmp_path, torch.bfloat16, LoraSpec(r=4, alpha=8, dropout=0.0))
    lora = client.lora
    lora_ids = {id(p) for p in lora.params().values()}
    frozen = [p for p in lora.peft.parameters() if id(p) not in lora_ids]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.dtype == torch.float32 for p in lora.params().values())
    batch = collate(examples([(5, 6), (3, 9)]), 0)
    adapter = client.layout.adapter_blocks
    with lora_steps(lora, adapter, 1e-3) as update:
        loss = response_lm_loss(lora.peft, batch)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        update.step(loss)
        states = [update.optimizer.state[p] for p in update.params]
    assert all(s["exp_avg"].dtype == torch.float32 for s in states)
    assert all(p.dtype == torch.float32 for p in lora.params().values())
    assert all(p.dtype == torch.bfloat16 for p in frozen)


def test_bad_dtype_and_accumulation_values_are_refused_naming_the_key() -> None:
    with pytest.raises(ConfigError, match="dtype='fp8'"):
        RunConfig.from_flower({"dtype": "fp8"})
    with pytest.raises(ConfigError, match="grad-accum-steps must be >= 1"):
        RunConfig.from_flower({"grad-accum-steps": 0})
    with pytest.raises(ConfigError, match="grad-accum-steps=2 is not supported with method=split"):
        RunConfig.from_flower({"grad-accum-steps": 2, "method": "split"})
    with pytest.raises(ConfigError, match="gradient-checkpointing='yes' must be of type bool"):
        RunConfig.from_flower({"gradient-checkpointing": "yes"})
    with pytest.raises(ConfigError, match="batch-size=True must be of type int"):
        RunConfig.from_flower({"batch-size": True})
    assert RunConfig.from_flower({"gradient-checkpointing": True}).gradient_checkpointing
    with pytest.raises(ValueError, match="node 3: node config dtype='half'"):
        resolve_dtype("half", torch.device("cpu"), "node 3: node config dtype")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
