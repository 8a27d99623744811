"""Emulator fidelity: zero KL and full agreement for the model itself; per-text KL and
agreement equal to those computed by hand for each text of a perturbed copy, with texts of
different response lengths in one batch; intervals that resample texts."""

import copy

import pytest
import torch
import torch.nn.functional as F

from models.fidelity import per_text_agreement
from server_app.evaluation.confidence import agreement_intervals
from tests.tiny import chat_batch, tiny


def _ragged_batch(tokenizer) -> dict[str, torch.Tensor]:
    """Three texts with 12, 5 and 0 response tokens (the last is skipped: nothing to score)."""
    batch = chat_batch(tokenizer, n=3, length=24)
    batch["labels"][1, :19] = -100
    batch["labels"][2, :] = -100
    return batch


def test_per_text_agreement_matches_each_text_by_hand() -> None:
    model, tokenizer = tiny("tiny-llama")
    batches = [chat_batch(tokenizer, n=2), _ragged_batch(tokenizer)]
    same = per_text_agreement(model, model, batches)
    assert same["tokens"] == [12.0, 12.0, 12.0, 5.0]
    assert same["kl"] == pytest.approx([0.0] * 4, abs=1e-5) and same["agree"] == same["tokens"]
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.add_(torch.randn_like(other.lm_head.weight) * 0.5)
    texts = per_text_agreement(model, other, batches)
    expected_kl, expected_agree = [], []
    for batch in batches:
        for row in range(len(batch["labels"])):
            # Positions whose next token is a response token, for this text alone.
            keep = (batch["labels"][row, 1:] != -100).nonzero().flatten()
            if not len(keep):
                continue
            ids = batch["input_ids"][row : row + 1]
            with torch.no_grad():
                teacher = model(input_ids=ids).logits[0, keep]
                student = other(input_ids=ids).logits[0, keep]
            kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1),
                          log_target=True, reduction="sum")  # fmt: skip
            expected_kl.append(float(kl))
            expected_agree.append(float((teacher.argmax(-1) == student.argmax(-1)).sum()))
    assert texts["kl"] == pytest.approx(expected_kl, rel=1e-4)
    assert texts["agree"] == expected_agree and sum(expected_agree) < sum(texts["tokens"])
    intervals = agreement_intervals(texts)
    kl = intervals["kl"]
    assert kl.value == pytest.approx(sum(expected_kl) / 41.0, rel=1e-4)
    assert kl.low < kl.value < kl.high  # texts differ, so resampling them moves the ratio
    assert intervals["top1"].value == pytest.approx(sum(expected_agree) / 41.0)
