"""Label log-likelihoods through the label trie equal full-sequence scoring."""

import pytest
import torch
import torch.nn.functional as F

from models.label_scores import label_log_likelihoods, label_token_ids
from tests.tiny import TINY, tiny


def _naive(model, prompt: list[int], label: list[int]) -> torch.Tensor:
    """Score one label by running prompt + label in one sequence."""
    ids = torch.tensor([prompt + label])
    logp = F.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    positions = range(len(prompt) - 1, len(prompt) + len(label) - 1)
    return sum(logp[p, t] for p, t in zip(positions, label, strict=True))


@pytest.mark.parametrize("name", TINY)
def test_trie_label_scores_match_full_sequences_and_backpropagate(name: str) -> None:
    model, tokenizer = tiny(name)
    model.eval()
    labels = label_token_ids(tokenizer, ["card_arrival", "top_up", "top_up_failed", "age"])
    assert all(ids[-1] == tokenizer.eos_token_id for ids in labels)
    prompts = [[5, 17, 99, 3], [42, 8, 1000, 77, 13, 2]]
    scores = label_log_likelihoods(model, prompts, labels)
    assert scores.shape == (2, 4)
    with torch.no_grad():
        expected = torch.stack(
            [torch.stack([_naive(model, p, lab) for lab in labels]) for p in prompts]
        )
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)
    scores.logsumexp(-1).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
