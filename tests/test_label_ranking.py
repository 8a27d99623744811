"""Exact label ranking (shared prefix cached once, branch and bound level by level) ranks every
label as the one-forward trie scorer does, and skips most of the trie once a model has learnt a
label."""

import json

import pytest
import torch

from models.label_ranking import LabelRanker, LabelSearch, shared_prefix_length
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


def _check_search(ranker: LabelRanker, search: LabelSearch, full: torch.Tensor, labels) -> None:
    """Every label scored to its end has its whole score, every other one a score so far that
    bounds it from above, and no trie node ran twice for this text."""
    for i, label in enumerate(labels):
        if search.scored[i] == len(label):
            assert search.scores[i] == pytest.approx(float(full[i]), abs=1e-4)
        else:
            assert search.scores[i] >= float(full[i]) - 1e-4
            assert search.scores[i] < search.scores[search.best]  # pruned for a reason
    assert ranker.counts.per_text_nodes[-1] == len(search.children) == len(search.position)


@pytest.mark.parametrize(
    ("name", "whole_below"), [*((name, 48) for name in TINY), ("tiny-llama", 0)]
)
def test_ranking_matches_the_trie_scorer_for_every_gold_label(name: str, whole_below: int) -> None:
    """The default cut-off, and level by level to the end (0)."""
    model, tokenizer = tiny(name)
    model.eval()
    prompts, labels, _ = _banking77(tokenizer, 2)
    prefix = prompts[0][: shared_prefix_length(prompts)]
    assert len(prefix) > 10  # the chat template and instruction are shared
    ranker = LabelRanker(model, labels, prefix, whole_below=whole_below)
    with torch.no_grad():
        full = label_log_likelihoods(model, prompts, labels)
    for text, prompt in enumerate(prompts):
        for gold in (0, 5, 76, int(full[text].argmax())):
            search = ranker.search(prompt, gold)
            assert search.best == int(full[text].argmax())
            assert search.scores[gold] == pytest.approx(float(full[text, gold]), abs=1e-4)
            _check_search(ranker, search, full[text], labels)
        assert ranker.rank(prompt, gold) == (search.best, search.scores[gold])
    if whole_below == 0:  # an untrained model prunes little: several levels per text
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


@pytest.mark.parametrize("whole_below", [0, 48])
def test_odd_label_sets_rank_as_the_trie_scorer_does(whole_below: int) -> None:
    """A label that is only EOS, one that is a prefix of another, two equal labels (the
    lower index wins the tie) and more probes than labels."""
    model, tokenizer = tiny("tiny-llama")
    model.eval()
    prompts, _, _ = _banking77(tokenizer, 2)
    eos = tokenizer.eos_token_id
    with torch.no_grad():  # the model's own greedy continuation of the first prompt
        first = int(model(torch.tensor([prompts[0]])).logits[0, -1].argmax())
        second = int(model(torch.tensor([[*prompts[0], first]])).logits[0, -1].argmax())
    labels = [
        [eos],
        [first, eos],
        [first, second, eos],
        [first, second, 11, 12, eos],
        [13, 14, eos],
    ]
    with torch.no_grad():
        winner = int(label_log_likelihoods(model, prompts[:1], labels)[0].argmax())
        labels.append(labels[winner])  # the first text's winner, twice: a tie, broken to the first
        full = label_log_likelihoods(model, prompts, labels)
    assert float(full[0, winner]) == float(full[0, -1]) == float(full[0].max())
    ranker = LabelRanker(model, labels, prompts[0][:12], probes=10, whole_below=whole_below)
    for text, prompt in enumerate(prompts):
        for gold in range(len(labels)):
            search = ranker.search(prompt, gold)
            assert search.best == int(full[text].argmax())
            assert search.scores[gold] == pytest.approx(float(full[text, gold]), abs=1e-4)
            _check_search(ranker, search, full[text], labels)


def test_a_prompt_off_the_prefix_is_refused() -> None:
    model, tokenizer = tiny("tiny-llama")
    prompts, labels, _ = _banking77(tokenizer, 2)
    ranker = LabelRanker(model, labels, prompts[0][:8])
    with pytest.raises(ValueError, match="shared prefix"):
        ranker.rank([1, 2, 3] + prompts[0], 0)
