"""Log-likelihood of every class label after a prompt: a generative LM's label logits.

A chat LM classifies by writing the label. Its distribution over a task's C labels is the
softmax of each label's sequence log-likelihood, scored on the exact response it is trained
on (the label's tokens, then EOS, so that a label that prefixes another is not favoured).
These C scores are what KD-FedLLM clients upload for a classification task.

Scoring C labels naively costs C forwards over prompt + label. Here the labels' proper
prefixes form a trie, and one forward runs the prompt followed by the trie's nodes under a
tree attention mask: a node sees the prompt and its own ancestors, at the position it would
have in its label. Shared prefixes are computed once and there is no KV-cache shuffling
(Banking77 with SmolLM2's tokenizer: 382 trie nodes instead of 481 label tokens, one forward
instead of 18; about 3x faster than a shared prompt cache on a CPU). The head runs only where
a score is read (``logits_to_keep``). It is differentiable, so a student backpropagates
through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase


def label_token_ids(tokenizer: PreTrainedTokenizerBase, labels: list[str]) -> list[list[int]]:
    """Each label as the response ``tokenize_record`` trains on: its tokens, then EOS."""
    return [
        [*tokenizer(label, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        for label in labels
    ]


@dataclass(frozen=True)
class LabelTrie:
    """The labels' proper prefixes as nodes (in order of first appearance, so a parent comes
    before its children), and every label token as an edge: row ``rows[e]`` of the kept
    logits (0: the prompt's last position, 1 + i: node i) predicts token ``targets[e]`` of
    label ``owners[e]``."""

    tokens: list[int]
    depths: list[int]
    ancestors: torch.Tensor  # (nodes, nodes) bool: node i sees node j (j == i included)
    rows: torch.Tensor
    targets: torch.Tensor
    owners: torch.Tensor

    @classmethod
    @lru_cache(maxsize=4)  # a run scores the same labels for every text and every KD step
    def build(cls, labels: tuple[tuple[int, ...], ...]) -> LabelTrie:
        index: dict[tuple[int, ...], int] = {}
        parents: list[int] = []
        rows, targets, owners = [], [], []
        for owner, label in enumerate(labels):
            row = 0
            for depth, token in enumerate(label):
                rows.append(row)
                targets.append(token)
                owners.append(owner)
                prefix = tuple(label[: depth + 1])
                if depth + 1 < len(label):
                    if prefix not in index:
                        index[prefix] = len(index)
                        parents.append(index[prefix[:-1]] if depth else -1)
                    row = 1 + index[prefix]
        ancestors = torch.eye(len(index), dtype=torch.bool)
        for node, parent in enumerate(parents):
            if parent >= 0:
                ancestors[node] |= ancestors[parent]
        nodes = sorted(index, key=index.__getitem__)
        return cls(
            tokens=[prefix[-1] for prefix in nodes],
            depths=[len(prefix) - 1 for prefix in nodes],
            ancestors=ancestors,
            rows=torch.tensor(rows),
            targets=torch.tensor(targets),
            owners=torch.tensor(owners),
        )


def _tree_mask(prompt_length: int, trie: LabelTrie, dtype: torch.dtype) -> torch.Tensor:
    """(1, 1, L, L) additive mask: causal over the prompt, each node sees the prompt and its
    ancestors. Additive rather than boolean so eager attention reads it too."""
    length = prompt_length + len(trie.tokens)
    allowed = torch.zeros(length, length, dtype=torch.bool)
    allowed[:prompt_length, :prompt_length] = torch.ones(
        prompt_length, prompt_length, dtype=torch.bool
    ).tril()
    allowed[prompt_length:, :prompt_length] = True
    allowed[prompt_length:, prompt_length:] = trie.ancestors
    mask = torch.zeros(length, length, dtype=dtype)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


def label_log_likelihoods(
    model: nn.Module, prompts: list[list[int]], labels: list[list[int]]
) -> torch.Tensor:
    """(N, C): ``log p(label_c | prompt_n)`` summed over the label's tokens."""
    device = next(model.parameters()).device
    dtype = model.get_input_embeddings().weight.dtype
    trie = LabelTrie.build(tuple(map(tuple, labels)))
    rows, targets, owners = (t.to(device) for t in (trie.rows, trie.targets, trie.owners))
    scores = []
    for prompt in prompts:
        n = len(prompt)
        keep = torch.zeros(n + len(trie.tokens), dtype=torch.bool, device=device)
        keep[n - 1 :] = True  # the prompt's last position, then every node
        positions = [*range(n), *(n + depth for depth in trie.depths)]
        out = model(
            input_ids=torch.tensor([prompt + trie.tokens], device=device),
            attention_mask=_tree_mask(n, trie, dtype).to(device),
            position_ids=torch.tensor([positions], device=device),
            logits_to_keep=keep,
        )
        logits = out.logits[0].float()
        picked = logits[rows, targets] - logits.logsumexp(-1)[rows]
        scores.append(torch.zeros(len(labels), device=device).index_add(0, owners, picked))
    return torch.stack(scores)
