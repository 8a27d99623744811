"""Log-likelihood of every class label after a prompt: a generative LM's label logits.

A chat LM classifies by writing the label. Its distribution over a task's C labels is the
softmax of each label's sequence log-likelihood, scored on the exact response it is trained
on (the label's tokens, then EOS, so that a label that prefixes another is not favoured).
These C scores are what KD-FedLLM clients upload for a classification task.

Scoring C labels naively costs C forwards over prompt + label. Here the prompt runs once, its
KV cache is repeated for the C continuations, and the labels are fed longest first in spans
that end at the next label length, dropping the labels that ended from the cache: each label
token is computed once and nothing is padded (Banking77 with SmolLM2's tokenizer: 481 label
tokens plus the prompt, instead of 77 x (prompt + 17)). It is differentiable, so a student
backpropagates through it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase


def label_token_ids(tokenizer: PreTrainedTokenizerBase, labels: list[str]) -> list[list[int]]:
    """Each label as the response ``tokenize_record`` trains on: its tokens, then EOS."""
    return [
        [*tokenizer(label, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
        for label in labels
    ]


def label_log_likelihoods(
    model: nn.Module, prompts: list[list[int]], labels: list[list[int]]
) -> torch.Tensor:
    """(N, C): ``log p(label_c | prompt_n)`` summed over the label's tokens."""
    device = next(model.parameters()).device
    # Longest first: the labels still running at any position are a prefix of this order.
    order = sorted(range(len(labels)), key=lambda c: -len(labels[c]))
    width = len(labels[order[0]])
    tokens = torch.zeros(len(labels), width, dtype=torch.long, device=device)
    for row, c in enumerate(order):
        tokens[row, : len(labels[c])] = torch.tensor(labels[c], device=device)
    lengths = [len(labels[c]) for c in order]
    rows = []
    for prompt in prompts:
        out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
        score = F.log_softmax(out.logits[0, -1].float(), dim=-1)[tokens[:, 0]]
        cache, start, running = out.past_key_values, 0, len(labels)
        cache.batch_repeat_interleave(running)
        # Feed label tokens [start, end) of the labels longer than ``start``; ``end`` is the
        # next label length, so no label in a span ends inside it: nothing is padded.
        for end in sorted({n - 1 for n in lengths if n > 1}):
            active = sum(n - 1 > start for n in lengths)
            if active < running:
                cache.batch_select_indices(torch.arange(active, device=device))
                running = active
            offset = len(prompt) + start
            logits = model(
                input_ids=tokens[:active, start:end],
                attention_mask=torch.ones(active, offset + end - start, device=device),
                past_key_values=cache,
                position_ids=torch.arange(offset, offset + end - start, device=device).expand(
                    active, -1
                ),
            ).logits.float()
            targets = tokens[:active, start + 1 : end + 1, None]
            picked = (logits.gather(2, targets)[..., 0] - logits.logsumexp(-1)).sum(1)
            score = score + F.pad(picked, (0, len(labels) - active))
            start = end
        rows.append(score[torch.tensor(order, device=device).argsort()])
    return torch.stack(rows)
