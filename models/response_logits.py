"""Logits at response positions only: the LM head runs where a loss is taken.

The vocabulary projection is a large share of a small LLM's compute (SmolLM2-135M: 28 M of
its 135 M parameters), and the prompt tokens carry no loss. Passing a boolean
``logits_to_keep`` mask lets transformers slice the hidden states before the head, so both
the head's forward and its backward shrink to the response tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def response_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean (batch, seq) mask of positions whose next token is a response token."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return keep


def response_logits(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, targets)``: (N, vocab) logits at the N response positions, their tokens."""
    keep = response_positions(batch["labels"])
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        logits_to_keep=keep,
    ).logits
    targets = batch["labels"][:, 1:][keep[:, :-1]]
    return logits.reshape(-1, logits.shape[-1]), targets


def response_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over response tokens (what HF's ``labels=`` loss computes)."""
    logits, targets = response_logits(model, batch)
    return F.cross_entropy(logits.float(), targets)
