"""Emulator distillation: lowers its loss, trains emulator LoRA only, KL on responses only."""

import itertools

import pytest
import torch

from models.blocks import get_blocks
from models.distillation import EmulatorDistiller, response_kl
from models.fedbiot_models import FedBiOTModels
from models.layout import fedbiot_layout
from models.lora import LoraSpec
from tests.tiny import TINY, chat_batch, tiny


@pytest.mark.parametrize("name", TINY)
def test_distillation_lowers_its_loss_and_changes_only_emulator_lora(name: str) -> None:
    model, tokenizer = tiny(name)
    layout = fedbiot_layout(len(get_blocks(model)), 2, 0.5)
    pair = FedBiOTModels(model, tokenizer, layout, LoraSpec(r=4, alpha=8, dropout=0.0))
    batch = chat_batch(tokenizer, n=4, length=32)
    distiller = EmulatorDistiller(pair, itertools.repeat(batch), learning_rate=5e-3, kd_lambda=1.0)
    with torch.no_grad():
        before_loss = distiller.losses(batch).total.item()
    assert before_loss > 0  # the emulator skips blocks, so it starts off the teacher
    compressed_before = {k: v.clone() for k, v in pair.compressed.peft.state_dict().items()}
    full_before = {k: v.clone() for k, v in pair.full.peft.state_dict().items()}

    distiller.run(30)

    with torch.no_grad():
        after_loss = distiller.losses(batch).total.item()
    assert after_loss < 0.8 * before_loss
    emulator = set(pair.compressed.params(layout.emulator_blocks))
    changed = {
        k
        for k, v in pair.compressed.peft.state_dict().items()
        if not torch.equal(v, compressed_before[k])
    }
    assert changed and all("lora_" in k for k in changed)
    assert len(changed) == len(emulator)
    assert all(torch.equal(v, full_before[k]) for k, v in pair.full.peft.state_dict().items())
    assert pair.adapter_state().keys() == pair.compressed.state(layout.adapter_blocks).keys()


def test_kl_ignores_prompt_positions() -> None:
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(1, 6, 11, generator=generator)
    student = torch.randn(1, 6, 11, generator=generator)
    labels = torch.tensor([[-100, -100, -100, 4, 5, 6]])
    base = response_kl(teacher, student, labels)
    # Logits at positions 0 and 1 predict prompt tokens 1 and 2: changing them changes nothing.
    student2 = student.clone()
    student2[:, :2] += 5 * torch.randn(1, 2, 11, generator=generator)
    torch.testing.assert_close(response_kl(teacher, student2, labels), base)
    # Position 2 predicts the first response token: it counts.
    student2[:, 2] += 5.0 * torch.randn(11, generator=generator)
    assert not torch.allclose(response_kl(teacher, student2, labels), base)
    # Equal distributions: zero.
    torch.testing.assert_close(response_kl(teacher, teacher, labels), torch.tensor(0.0))
    # Matches the definition sum_v p_T (log p_T - log p_S), mean over the 3 positions.
    p_t = teacher[0, 2:5].log_softmax(-1)
    p_s = student[0, 2:5].log_softmax(-1)
    expected = (p_t.exp() * (p_t - p_s)).sum(-1).mean()
    torch.testing.assert_close(base, expected)
