"""Held-out scores per text: the gold label's NLL is minus its trie score, ranking agrees with
the trie scorer, and the summary's paired comparison against the base is on the same texts."""

import json

import pytest
import torch

from federation.local_training import response_loss
from models.blocks import get_blocks
from models.label_scores import label_log_likelihoods, label_token_ids
from models.lora import LoraModel, LoraSpec
from server_app.evaluation.heldout import HeldoutResult, macro_f1, score_records
from task_data import collate, load_records, tokenize_records
from task_data.formatting import prompt_ids
from task_data.sources import default_data_dir
from tests.tiny import TINY, tiny


@pytest.mark.parametrize("name", TINY)
def test_gold_nll_and_ranking_match_the_trie_scorer(name: str) -> None:
    model, tokenizer = tiny(name)
    model.eval()
    labels = json.loads((default_data_dir() / "banking77" / "categories.json").read_text())
    records = load_records("banking77", "test")[:5]
    result = score_records(model, tokenizer, records, 128, batch_size=2, labels=labels, ranked=3)
    with torch.no_grad():
        scores = label_log_likelihoods(
            model, [prompt_ids(tokenizer, r) for r in records], label_token_ids(tokenizer, labels)
        )
    gold = [labels.index(r["label"]) for r in records]
    expected = [-float(scores[i, g]) for i, g in enumerate(gold)]
    assert result.nll == pytest.approx(expected, abs=1e-3)
    assert result.predicted == [labels[int(row.argmax())] for row in scores[:3]]
    assert result.gold == [r["label"] for r in records[:3]]
    blocks = tuple(range(len(get_blocks(model))))
    lora = LoraModel(model, blocks, blocks[-1:], LoraSpec(r=4, alpha=8))
    batches = [collate(tokenize_records(tokenizer, records, 128), tokenizer.pad_token_id)]
    assert sum(result.nll) / sum(result.tokens) == pytest.approx(
        response_loss(lora, batches), rel=1e-5
    )


def test_summary_compares_with_the_base_on_the_same_texts() -> None:
    base = HeldoutResult([4.0] * 40, [2] * 40, ["a"] * 40, ["a"] * 10 + ["b"] * 30)
    better = HeldoutResult([3.0] * 40, [2] * 40, ["a"] * 10 + ["b"] * 30, base.gold)
    summary = better.summary(base)
    assert summary["loss"] == 1.5
    assert (summary["loss_vs_base"], summary["loss_vs_base_ci_high"]) == (-0.5, -0.5)
    assert summary["accuracy"] == 1.0 and summary["accuracy_ci_low"] < 1.0
    assert summary["accuracy_vs_base"] == pytest.approx(0.75)
    assert summary["accuracy_vs_base_p"] == pytest.approx(2 * 0.5**30)
    assert "loss_vs_base" not in base.summary()
    with pytest.raises(ValueError, match="other texts"):
        better.summary(HeldoutResult([1.0], [1]))


def test_macro_f1_counts_labels_only_predicted() -> None:
    # "c" is predicted but never gold: sklearn's macro average includes it with F1 0.
    assert macro_f1(["a", "b"], ["a", "c"]) == pytest.approx((1 + 0 + 0) / 3)
    assert macro_f1(["a", "a", "b"], ["a", "a", "b"]) == 1.0


def test_a_bad_base_cache_is_ignored_not_trusted(tmp_path) -> None:
    from server_app.server_eval import _read_cached

    good = HeldoutResult([1.0, 2.0], [1, 2], ["a"], ["b"])
    path = tmp_path / "base.json"
    path.write_text(json.dumps(good.to_json()))
    assert _read_cached(path, texts=2, ranked=1) == good
    assert _read_cached(path, texts=3, ranked=1) is None  # other texts
    path.write_text('{"nll": [1.0')
    assert _read_cached(path, texts=2, ranked=1) is None  # truncated file
