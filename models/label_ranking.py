"""Exact label ranking for evaluation, cheaper than scoring every label of every text.

``label_scores.label_log_likelihoods`` scores all C labels of one prompt in one forward over
the prompt and the labels' trie (382 nodes for Banking77 on SmolLM2). Evaluation needs less:
the label with the highest score, and whether it is the gold one. Two savings keep the answer
exact:

1. **Shared prefix, computed once.** Every evaluation prompt starts with the same tokens (the
   chat template's system prompt and the task's instruction). Their KV cache is computed once
   and each text runs only its own suffix on top of it.
2. **Branch and bound.** A label's score is a sum of log-probabilities, each <= 0, so the
   log-probability of its first token (read off the prompt's last position, already computed)
   bounds its score from above. The gold label and the ``probes`` labels with the highest
   bounds are scored exactly first (one small forward over their trie); the best of these
   scores bounds the winner's from below, so a label whose upper bound is below it cannot be
   ranked first, and only the trie of the remaining labels runs. A model that has learnt the
   task puts most of its mass on the gold label's first token, so most of the trie is
   skipped.

Ties are broken towards the lower label index, as ``argmax`` over all scores does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache

from models.label_scores import LabelTrie, _tree_mask


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """Length of the longest common prefix, kept one short of the shortest prompt so that every
    prompt still runs at least its last token (whose logits predict the label)."""
    if not prompts:
        return 0
    shortest = min(len(p) for p in prompts)
    length = 0
    while length < shortest - 1 and all(p[length] == prompts[0][length] for p in prompts):
        length += 1
    return length


@dataclass
class RankCounts:
    """How much of the trie ranking ran, for the cost benchmark."""

    texts: int = 0
    nodes_run: int = 0
    nodes_total: int = 0
    prompt_tokens_run: int = 0
    prompt_tokens_total: int = 0
    per_text_nodes: list[int] = field(default_factory=list)


class LabelRanker:
    """Ranks ``labels`` (token ids, EOS included) after prompts that share a prefix."""

    def __init__(
        self, model: nn.Module, labels: list[list[int]], prefix: list[int], probes: int = 2
    ) -> None:
        self.model = model
        self.probes = probes
        self.labels = [tuple(label) for label in labels]
        self.device = next(model.parameters()).device
        self.dtype = model.get_input_embeddings().weight.dtype
        self.prefix = list(prefix)
        self.counts = RankCounts()
        self.trie_nodes = len(LabelTrie.build(tuple(self.labels)).tokens)
        self.cache = DynamicCache(config=getattr(model, "config", None))
        if self.prefix:
            self._forward(self.prefix, None, list(range(len(self.prefix))), keep_last=False)

    def _forward(
        self,
        tokens: list[int],
        mask: torch.Tensor | None,
        positions: list[int],
        keep_last: bool,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run ``tokens`` on top of the cache (which grows by them); float32 logits kept."""
        if keep is None:
            keep = torch.zeros(len(tokens), dtype=torch.bool)
            keep[-1] = keep_last
        out = self.model(
            input_ids=torch.tensor([tokens], device=self.device),
            attention_mask=None if mask is None else mask.to(self.device),
            position_ids=torch.tensor([positions], device=self.device),
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=keep.to(self.device),
        )
        return out.logits[0].float()

    def _causal_mask(self, past: int, length: int) -> torch.Tensor:
        mask = torch.zeros(length, past + length, dtype=self.dtype)
        upper = torch.ones(length, length, dtype=torch.bool).triu(1)
        mask[:, past:] = mask[:, past:].masked_fill(upper, torch.finfo(self.dtype).min)
        return mask[None, None]

    def _trie_scores(self, labels: list[int], past: int, last: torch.Tensor) -> torch.Tensor:
        """Exact scores of ``labels`` (indices), one forward over their trie after ``past``
        cached tokens whose last position's log-probabilities are ``last``."""
        trie = LabelTrie.build(tuple(self.labels[i] for i in labels))
        rows = torch.cat([last[None], self._nodes(trie, past)]) if trie.tokens else last[None]
        picked = rows[trie.rows, trie.targets]
        scores = torch.zeros(len(labels)).index_add(0, trie.owners, picked)
        self.counts.nodes_run += len(trie.tokens)
        self.counts.per_text_nodes[-1] += len(trie.tokens)
        return scores

    def _nodes(self, trie: LabelTrie, past: int) -> torch.Tensor:
        """Log-probabilities at every trie node, run after ``past`` cached tokens."""
        full = _tree_mask(1, trie, self.dtype)[0, 0, 1:, 1:]  # nodes vs nodes
        mask = torch.zeros(len(trie.tokens), past + len(trie.tokens), dtype=self.dtype)
        mask[:, past:] = full
        positions = [past + depth for depth in trie.depths]
        keep = torch.ones(len(trie.tokens), dtype=torch.bool)
        logits = self._forward(trie.tokens, mask[None, None], positions, False, keep)
        self._truncate(past)
        return logits.float().log_softmax(-1).cpu()

    @torch.no_grad()
    def rank(self, prompt: list[int], gold: int) -> tuple[int, float]:
        """(index of the highest-scoring label, the gold label's score) after ``prompt``."""
        n = len(self.prefix)
        if prompt[:n] != self.prefix or len(prompt) <= n:
            raise ValueError("the prompt does not extend the ranker's shared prefix")
        suffix = prompt[n:]
        self.counts.texts += 1
        self.counts.per_text_nodes.append(0)
        self.counts.prompt_tokens_run += len(suffix)
        self.counts.prompt_tokens_total += len(prompt)
        self.counts.nodes_total += self.trie_nodes
        last = (
            self._forward(
                suffix, self._causal_mask(n, len(suffix)), list(range(n, len(prompt))), True
            )[-1]
            .float()
            .log_softmax(-1)
            .cpu()
        )
        past = len(prompt)
        bounds = torch.tensor([float(last[label[0]]) for label in self.labels])
        # Probe the gold label and the labels whose first token is likeliest: the best of their
        # exact scores is a lower bound on the winner's, which prunes every label whose upper
        # bound falls below it.
        order = [i for i in bounds.argsort(descending=True).tolist() if i != gold]
        probed = [gold, *order[: self.probes]]
        scores = dict(zip(probed, self._trie_scores(probed, past, last).tolist(), strict=True))
        best = min(scores, key=lambda i: (-scores[i], i))
        rivals = [i for i in order[self.probes :] if bounds[i] >= scores[best]]
        if rivals:
            scores |= zip(rivals, self._trie_scores(rivals, past, last).tolist(), strict=True)
            best = min(scores, key=lambda i: (-scores[i], i))
        gold_score = scores[gold]
        self._truncate(n)
        return best, gold_score

    def _truncate(self, length: int) -> None:
        """Drop the cache back to its first ``length`` tokens (``crop`` takes a negative count
        of tokens to remove)."""
        extra = self.cache.get_seq_length() - length
        if extra:
            self.cache.crop(-extra)
