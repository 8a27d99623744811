"""Emulator fidelity: zero KL and full agreement for the model itself, and a KL equal to the
one computed by hand for a perturbed copy."""

import copy

import pytest
import torch
import torch.nn.functional as F

from models.fidelity import agreement
from models.response_logits import response_logits
from tests.tiny import chat_batch, tiny


def test_agreement_of_a_model_with_itself_and_with_a_perturbed_copy() -> None:
    model, tokenizer = tiny("tiny-llama")
    batches = [chat_batch(tokenizer, n=2), chat_batch(tokenizer, n=3, length=16)]
    same = agreement(model, model, batches)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["top1"] == 1.0
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lm_head.weight.add_(torch.randn_like(other.lm_head.weight) * 0.5)
    result = agreement(model, other, batches)
    rows = [response_logits(m, b)[0] for b in batches for m in (model, other)]
    teacher, student = torch.cat(rows[0::2]), torch.cat(rows[1::2])
    expected = F.kl_div(
        F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True,
        reduction="batchmean",
    )  # fmt: skip
    assert result["kl"] == pytest.approx(float(expected), rel=1e-4)
    top1 = (teacher.argmax(-1) == student.argmax(-1)).float().mean()
    assert result["top1"] == pytest.approx(float(top1)) and result["top1"] < 1.0
