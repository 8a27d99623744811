"""Exact label ranking (shared prefix cached once, branch and bound level by level) ranks every
label as the one-forward trie scorer does, and skips most of the trie once a model has learnt a
label."""

import json

import pytest
import torch

from models.label_ranking import LabelRanker, shared_prefix_length
from models.label_scores import label_log_likelihoods, label_token_ids
from server_app.evaluation.generation import chat_prompt
from task_data import load_records
from task_data.sources import default_data_dir
from tests.tiny import TINY, tiny


def _banking77(tokenizer, texts: int) -> tuple[list[list[int]], list[list[int]], list[int]]:
    names = json.loads((default_data_dir() / "banking77" / "categories.json").read_text())
    records = load_records("banking77", "test")[:texts]
    prompts = [chat_prompt(tokenizer, f"{r['instruction']}\n\n{r['input']}") for r in records]
    gold = [names.index(r["label"]) for r in records]
    return prompts, label_token_ids(tokenizer, names), gold


@pytest.mark.parametrize(
    ("name", "whole_below"),
    [*((name, 48) for name in TINY), ("tiny-llama", 0), ("tiny-llama", 10**6)],
)
def test_ranking_matches_the_trie_scorer_for_every_gold_label(name: str, whole_below: int) -> None:
    """Level by level to the end (0), the default cut-off, and every rival in one forward."""
    model, tokenizer = tiny(name)
    model.eval()
    prompts, labels, _ = _banking77(tokenizer, 2)
    prefix = prompts[0][: shared_prefix_length(prompts)]
    assert len(prefix) > 10  # the chat template and instruction are shared
    ranker = LabelRanker(model, labels, prefix, whole_below=whole_below)
    with torch.no_grad():
        full = label_log_likelihoods(model, prompts, labels)
    golds = (0, 5, 76)
    for text, prompt in enumerate(prompts):
        for gold in (*golds, int(full[text].argmax())):
            best, gold_score = ranker.rank(prompt, gold)
            assert best == int(full[text].argmax())
            assert gold_score == pytest.approx(float(full[text, gold]), abs=1e-4)
    # A trie node runs at most once per text; without levels a text takes three forwards at
    # most (its prompt, the probed labels, the rivals).
    assert max(ranker.counts.per_text_nodes) <= ranker.trie_nodes
    if whole_below == 10**6:
        assert ranker.counts.forwards <= 3 * ranker.counts.texts
    if whole_below == 0:  # an untrained model prunes little: many levels
        assert ranker.counts.forwards > 3 * ranker.counts.texts


def test_a_trained_model_prunes_the_trie_and_ranks_exactly() -> None:
    model, tokenizer = tiny("tiny-llama")
    prompts, labels, _ = _banking77(tokenizer, 2)
    target = labels[11]
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(8):  # teach label 11 after any of these prompts
        for prompt in prompts:
            ids = torch.tensor([prompt + target])
            targets = ids.clone()
            targets[0, : len(prompt)] = -100
            model(input_ids=ids, labels=targets).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        full = label_log_likelihoods(model, prompts, labels)
    assert all(int(row.argmax()) == 11 for row in full)
    ranker = LabelRanker(model, labels, prompts[0][: shared_prefix_length(prompts)])
    for text, prompt in enumerate(prompts):
        for gold in (11, 40):
            assert ranker.rank(prompt, gold)[0] == int(full[text].argmax())
    learnt = ranker.counts.per_text_nodes[0::2]  # gold 11: the label the model predicts
    assert max(learnt) < ranker.counts.nodes_total / ranker.counts.texts / 4
    assert ranker.counts.prompt_tokens_run < ranker.counts.prompt_tokens_total / 2


def test_a_prompt_off_the_prefix_is_refused() -> None:
    model, tokenizer = tiny("tiny-llama")
    prompts, labels, _ = _banking77(tokenizer, 2)
    ranker = LabelRanker(model, labels, prompts[0][:8])
    with pytest.raises(ValueError, match="shared prefix"):
        ranker.rank([1, 2, 3] + prompts[0], 0)
