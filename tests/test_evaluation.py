"""Evaluators: GSM8K answer extraction, pass@k, Banking77 scoring and perplexity (the
sandbox and HumanEval have their own test files)."""

from __future__ import annotations

import math

import pytest
import torch

from models.label_scores import label_token_ids
from server_app.evaluation.answers import extract_answer
from server_app.evaluation.passk import pass_at_k
from server_app.evaluation.tasks import (
    banking77,
    macro_f1,
    perplexity,
)
from task_data import collate, load_records, tokenize_records
from task_data.validation import subset
from tests.tiny import tiny


def test_answer_extraction_on_real_gsm8k_rows() -> None:
    for row in load_records("gsm8k", "train")[:50]:
        final = row["output"].rsplit("####", 1)[1].strip().replace(",", "")
        assert extract_answer(row["output"]) == final


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("So she pays 3 + 4 = 7 dollars.\nThe answer is $1,234.", "1234"),
        ("#### -5", "-5"),
        ("He ends with 12.50 dollars and then 3 more", "3"),
        ("The final answer is: 12.0", "12"),
        ("It costs $0.75 each. The answer is 0.75.", "0.75"),
        ("no numbers here", None),
        ("#### 18\nThe answer is 20", "18"),  # '####' wins over a later sentence
    ],
)
def test_answer_extraction_on_tricky_strings(text: str, answer: str | None) -> None:
    assert extract_answer(text) == answer


@pytest.mark.parametrize(
    ("n", "c", "k"), [(10, 3, 1), (10, 3, 5), (20, 0, 3), (5, 5, 2), (200, 17, 10)]
)
def test_pass_at_k_equals_the_closed_form(n: int, c: int, k: int) -> None:
    closed = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(closed)


def test_pass_at_k_rejects_impossible_counts() -> None:
    with pytest.raises(ValueError, match="pass@k"):
        pass_at_k(3, 4, 1)


def test_macro_f1_by_hand() -> None:
    gold = ["a", "a", "b", "c"]
    predicted = ["a", "b", "b", "b"]
    # a: tp 1 fp 0 fn 1 -> 2/3; b: tp 1 fp 2 fn 0 -> 1/2; c: tp 0 -> 0
    assert macro_f1(gold, predicted) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)


def test_banking77_generate_mode_counts_only_label_names() -> None:
    """The untrained tiny model's free text names no intent: nothing may count as right
    (a parser that mapped any text onto some label would score it above zero)."""
    model, tokenizer = tiny("tiny-llama")
    result = banking77(model, tokenizer, size=3, seed=0, mode="generate")
    assert result == {"accuracy": 0.0, "macro_f1": 0.0, "examples": 3}


def test_banking77_rank_mode_predicts_the_label_the_model_favours() -> None:
    model, tokenizer = tiny("tiny-llama")
    favoured = subset(load_records("banking77", "test"), 3, 0)[1]["label"]
    head = model.get_output_embeddings()
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.zero_()
        biased.bias[label_token_ids(tokenizer, [favoured])[0]] = 30.0
    model.lm_head = biased  # every token of one label (and EOS) made likely everywhere

    result = banking77(model, tokenizer, size=3, seed=0, mode="rank")

    gold = [r["label"] for r in subset(load_records("banking77", "test"), 3, 0)]
    assert result["accuracy"] == pytest.approx(gold.count(favoured) / 3)
    assert result["macro_f1"] == pytest.approx(macro_f1(gold, [favoured] * 3))


def test_perplexity_is_exp_of_the_mean_response_loss() -> None:
    model, tokenizer = tiny("tiny-llama")
    result = perplexity(model, tokenizer, "gsm8k", size=3, seed=0, seq_length=64, batch_size=2)
    records = load_records("gsm8k", "test")
    examples = tokenize_records(tokenizer, subset(records, 3, 0), 64)
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        mean_loss = model(**batch).loss.item()  # transformers' own mean over response tokens
    assert result["perplexity"] == pytest.approx(math.exp(mean_loss), rel=1e-4)
