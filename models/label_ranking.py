"""Exact label ranking for evaluation, cheaper than scoring every label of every text.

``label_scores.label_log_likelihoods`` scores all C labels of one prompt in one forward over
the prompt and the labels' trie (382 nodes for Banking77 on SmolLM2). Evaluation needs less:
the label with the highest score, and whether it is the gold one. Two savings keep the answer
exact:

1. **Shared prefix, computed once.** Every evaluation prompt starts with the same tokens (the
   chat template's system prompt and the task's instruction). Their KV cache is computed once
   and each text runs only its own suffix on top of it.
2. **Branch and bound, level by level.** A label's score is a sum of log-probabilities, each
   <= 0, so the sum over its first k tokens bounds its whole score from above. The gold label
   and the ``probes`` labels whose first token is likeliest (read off the prompt's last
   position, already computed) are scored whole first, in one forward over their trie; the
   best finished score bounds the winner's from below. Every unfinished label whose bound is
   not below it then runs one token further (one forward over those trie nodes, on top of
   the nodes already in the KV cache), the bounds tighten, and the rest are dropped; once
   few nodes remain (``whole_below``) they run in one forward. A trie node runs at most
   once per text. Each forward costs a weight pass whatever its size, so going level by
   level pays only while it prunes many nodes: the cut-off is measured by
   ``bench/eval_cost.py``.

Ties are broken towards the lower label index, as ``argmax`` over all scores does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache

from models.label_scores import LabelTrie


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
    forwards: int = 0
    per_text_nodes: list[int] = field(default_factory=list)


@dataclass
class LabelSearch:
    """One text's ranking: each label's score over its first ``scored`` tokens (an upper
    bound on its whole score until it is finished), the trie nodes run, by prefix: their
    position in the KV cache and the log-probabilities of their children; ``best`` once done."""

    scores: list[float]
    scored: list[int]
    position: dict[tuple[int, ...], int] = field(default_factory=dict)
    children: dict[tuple[int, ...], dict[int, float]] = field(default_factory=dict)
    best: int = -1


class LabelRanker:
    """Ranks ``labels`` (token ids, EOS included) after prompts that share a prefix."""

    def __init__(
        self,
        model: nn.Module,
        labels: list[list[int]],
        prefix: list[int],
        probes: int = 2,
        whole_below: int = 48,
    ) -> None:
        self.model = model
        self.probes = probes
        self.whole_below = whole_below
        self.labels = [tuple(label) for label in labels]
        # The tokens that follow each proper prefix of a label: what a trie node's forward keeps.
        self.next_tokens: dict[tuple[int, ...], list[int]] = {}
        for label in self.labels:
            for depth in range(1, len(label)):
                following = self.next_tokens.setdefault(label[:depth], [])
                if label[depth] not in following:
                    following.append(label[depth])
        self.device = next(model.parameters()).device
        self.dtype = model.get_input_embeddings().weight.dtype
        self.prefix = list(prefix)
        self.counts = RankCounts()
        self.trie_nodes = len(LabelTrie.build(tuple(self.labels)).tokens)
        self.cache = DynamicCache(config=getattr(model, "config", None))
        if self.prefix:
            self._forward(self.prefix, None, list(range(len(self.prefix))))

    def _forward(
        self,
        tokens: list[int],
        mask: torch.Tensor | None,
        positions: list[int],
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run ``tokens`` on top of the cache (which grows by them); float32 logits of the
        ``keep`` positions (none by default)."""
        if keep is None:
            keep = torch.zeros(len(tokens), dtype=torch.bool)
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
        """(1, 1, length, past + length) additive mask: all of the cache, causal over the new."""
        mask = torch.zeros(length, past + length, dtype=self.dtype)
        upper = torch.ones(length, length, dtype=torch.bool).triu(1)
        mask[:, past:] = mask[:, past:].masked_fill(upper, torch.finfo(self.dtype).min)
        return mask[None, None]

    def _needed(self, search: LabelSearch, labels: list[int], whole: bool) -> list[tuple[int, ...]]:
        """The trie nodes (prefixes) not yet run that ``labels`` need to be scored to their
        end (``whole``) or one token further, parents before children."""
        needed: dict[tuple[int, ...], None] = {}
        for i in labels:
            label = self.labels[i]
            for depth in range(search.scored[i], len(label) if whole else search.scored[i] + 1):
                if label[:depth] not in search.children:
                    needed[label[:depth]] = None
        return list(needed)

    def _advance(self, search: LabelSearch, labels: list[int], whole: bool, past: int) -> None:
        """Score ``labels`` to their end or one token further, running the nodes missing."""
        if needed := self._needed(search, labels, whole):
            self._run(needed, search, past)
        for i in labels:
            label = self.labels[i]
            stop = len(label) if whole else search.scored[i] + 1
            while search.scored[i] < stop:
                depth = search.scored[i]
                search.scores[i] += search.children[label[:depth]][label[depth]]
                search.scored[i] += 1

    def _run(self, prefixes: list[tuple[int, ...]], search: LabelSearch, past: int) -> None:
        """One forward over the trie nodes ``prefixes`` (each runs its last token) on top of the
        ``past`` prompt tokens and the nodes already cached: a node sees the prompt, its
        ancestors and itself, at the position after its parent."""
        length = self.cache.get_seq_length()
        for j, prefix in enumerate(prefixes):
            search.position[prefix] = length + j
        mask = torch.full(
            (len(prefixes), length + len(prefixes)), torch.finfo(self.dtype).min, dtype=self.dtype
        )
        mask[:, :past] = 0.0
        for j, prefix in enumerate(prefixes):
            mask[j, [search.position[prefix[:k]] for k in range(1, len(prefix) + 1)]] = 0.0
        positions = [past + len(prefix) - 1 for prefix in prefixes]
        keep = torch.ones(len(prefixes), dtype=torch.bool)
        logits = self._forward([p[-1] for p in prefixes], mask[None, None], positions, keep)
        log_probs = logits.log_softmax(-1).cpu()
        for j, prefix in enumerate(prefixes):
            following = self.next_tokens[prefix]
            search.children[prefix] = dict(
                zip(following, log_probs[j, following].tolist(), strict=True)
            )
        self.counts.forwards += 1
        self.counts.nodes_run += len(prefixes)
        self.counts.per_text_nodes[-1] += len(prefixes)

    def rank(self, prompt: list[int], gold: int) -> tuple[int, float]:
        """(index of the highest-scoring label, the gold label's score) after ``prompt``."""
        search = self.search(prompt, gold)
        return search.best, search.scores[gold]

    @torch.no_grad()
    def search(self, prompt: list[int], gold: int) -> LabelSearch:
        """The finished search after ``prompt``: ``best`` and every label's score as far as it
        was run (the gold label's and the winner's whole)."""
        n = len(self.prefix)
        if prompt[:n] != self.prefix or len(prompt) <= n:
            raise ValueError("the prompt does not extend the ranker's shared prefix")
        suffix = prompt[n:]
        self.counts.texts += 1
        self.counts.forwards += 1
        self.counts.per_text_nodes.append(0)
        self.counts.prompt_tokens_run += len(suffix)
        self.counts.prompt_tokens_total += len(prompt)
        self.counts.nodes_total += self.trie_nodes
        last_only = torch.zeros(len(suffix), dtype=torch.bool)
        last_only[-1] = True
        try:  # the cache goes back to the shared prefix even if a forward fails
            mask = self._causal_mask(n, len(suffix))
            last = self._forward(suffix, mask, list(range(n, len(prompt))), last_only)[-1]
            return self._branch_and_bound(last.log_softmax(-1).cpu(), gold, len(prompt))
        finally:
            self._truncate(n)

    def _branch_and_bound(self, last: torch.Tensor, gold: int, past: int) -> LabelSearch:
        """The search from the first tokens' log-probabilities ``last`` (see the module)."""
        first = [float(last[label[0]]) for label in self.labels]
        search = LabelSearch(first, [1] * len(first))
        likeliest = torch.tensor(search.scores).argsort(descending=True).tolist()
        probed = [gold, *[i for i in likeliest if i != gold][: self.probes]]
        self._advance(search, probed, True, past)
        unfinished = list(range(len(self.labels)))
        while True:
            finished = (i for i, label in enumerate(self.labels) if search.scored[i] == len(label))
            search.best = min(finished, key=lambda i: (-search.scores[i], i))
            # ">=": a label that ties the best may still win on its lower index.
            unfinished = [
                i
                for i in unfinished
                if search.scored[i] < len(self.labels[i])
                and search.scores[i] >= search.scores[search.best]
            ]
            if not unfinished:
                return search
            # Few nodes left: all at once; many: one level, then prune again.
            whole = len(self._needed(search, unfinished, True)) <= self.whole_below
            self._advance(search, unfinished, whole, past)

    def _truncate(self, length: int) -> None:
        """Drop the cache back to its first ``length`` tokens (``crop`` takes a negative count
        of tokens to remove)."""
        extra = self.cache.get_seq_length() - length
        if extra:
            self.cache.crop(-extra)
