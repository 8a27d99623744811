"""Tiny random-weight models for the tests (built once per cache, shared by processes)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from models.loading import load_model

TINY = ("tiny-llama", "tiny-gpt2")


def tiny(name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A fresh copy of a tiny model (tests may change it)."""
    torch.manual_seed(0)
    return load_model(name)


def chat_batch(tokenizer: PreTrainedTokenizerBase, n: int = 2, length: int = 24) -> dict:
    """A batch whose first half is prompt (labels -100) and second half response."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 1000, (n, length), generator=generator)
    labels = ids.clone()
    labels[:, : length // 2] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
