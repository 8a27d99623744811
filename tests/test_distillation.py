"""Emulator distillation: lowers its loss, trains emulator LoRA only, KL on responses only."""

import itertools

import pytest
import torch

from models.blocks import get_blocks
from models.distillation import EmulatorDistiller, kl_per_token
from models.fedbiot_models import FedBiOTModels
from models.layout import fedbiot_layout
from models.lora import LoraSpec
from models.response_logits import response_lm_loss, response_logits, response_positions
from tests.tiny import TINY, chat_batch, tiny

NORMS = [(name, "relative") for name in TINY] + [(TINY[0], "raw")]


@pytest.mark.parametrize(("name", "hidden_norm"), NORMS)
def test_distillation_lowers_its_loss_and_changes_only_emulator_lora(
    name: str, hidden_norm: str
) -> None:
    model, tokenizer = tiny(name)
    layout = fedbiot_layout(len(get_blocks(model)), 2, 0.5)
    pair = FedBiOTModels(model, tokenizer, layout, LoraSpec(r=4, alpha=8, dropout=0.0))
    batch = chat_batch(tokenizer, n=4, length=32)
    distiller = EmulatorDistiller(pair, itertools.repeat(batch), learning_rate=5e-3,
                                  kd_lambda=1.0, hidden_norm=hidden_norm)  # fmt: skip
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


def test_hidden_term_is_the_squared_error_per_token_or_relative_to_the_teacher() -> None:
    """Both hidden-state terms against their definitions, from the two models' own hidden
    states at the first adapter block's input: ``raw`` is the squared error summed over the
    hidden size and averaged over non-padding tokens, ``relative`` the same squared error
    over the teacher's squared norm; padding counts in neither."""
    model, tokenizer = tiny(TINY[0])
    layout = fedbiot_layout(len(get_blocks(model)), 2, 0.5)
    pair = FedBiOTModels(model, tokenizer, layout, LoraSpec(r=4, alpha=8, dropout=0.0))
    batch = chat_batch(tokenizer, n=3, length=16)
    batch["attention_mask"][0, -5:] = 0
    terms = {}
    for norm in ("relative", "raw"):
        distiller = EmulatorDistiller(pair, iter([]), 1e-3, 1.0, hidden_norm=norm)
        with torch.no_grad():
            terms[norm] = distiller.losses(batch).hidden.item()
    with torch.no_grad():
        out = pair.full.peft(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=True,
        )
        student = pair.compressed.peft(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=True,
        ).hidden_states[layout.kept_blocks.index(layout.distill_tap)]
    teacher = out.hidden_states[layout.distill_tap]
    mask = batch["attention_mask"].bool()
    error = ((student - teacher)[mask] ** 2).sum().item()
    tokens = int(mask.sum())
    assert terms["raw"] == pytest.approx(error / tokens, rel=1e-4)
    assert terms["relative"] == pytest.approx(error / (teacher[mask] ** 2).sum().item(), rel=1e-4)
    assert terms["raw"] != pytest.approx(terms["relative"], rel=1e-2)
    with pytest.raises(ValueError, match="hidden_norm='l1'"):
        EmulatorDistiller(pair, iter([]), 1e-3, 1.0, hidden_norm="l1")


def test_kl_matches_its_definition() -> None:
    generator = torch.Generator().manual_seed(0)
    teacher = torch.randn(3, 11, generator=generator)
    student = torch.randn(3, 11, generator=generator)
    p_t, p_s = teacher.log_softmax(-1), student.log_softmax(-1)
    expected = (p_t.exp() * (p_t - p_s)).sum(-1).mean()
    torch.testing.assert_close(kl_per_token(teacher, student), expected)
    torch.testing.assert_close(kl_per_token(teacher, teacher), torch.tensor(0.0))


@pytest.mark.parametrize("name", TINY)
def test_response_logits_are_the_full_logits_at_response_positions(name: str) -> None:
    model, tokenizer = tiny(name)
    batch = chat_batch(tokenizer, n=2, length=16)
    batch["labels"][1, 12:] = -100  # rows with different response lengths
    batch["attention_mask"][1, 14:] = 0
    keep = response_positions(batch["labels"])
    # Position t is kept when token t + 1 is a response token: t = 7..14 and 7..10.
    assert keep[0].nonzero().flatten().tolist() == list(range(7, 15))
    assert keep[1].nonzero().flatten().tolist() == list(range(7, 11))
    with torch.no_grad():
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits, targets = response_logits(model, batch)
        torch.testing.assert_close(logits, full[keep])
        torch.testing.assert_close(targets, batch["input_ids"][:, 1:][keep[:, :-1]])
        hf_loss = model(**batch).loss
        torch.testing.assert_close(response_lm_loss(model, batch), hf_loss)
