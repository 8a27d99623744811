"""Tiny random-weight models for the tests (built once per cache, shared by processes)."""

from __future__ import annotations

import torch
from flwr.supercore.task_identity import TaskIdentity
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from models.blocks import get_blocks
from models.fedbiot_models import FedBiOTModels
from models.layout import fedbiot_layout
from models.loading import load_model
from models.lora import LoraSpec

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


# FedBiAlign's tests: the adapter region is the last 6 of the tiny model's 8 blocks.
ADAPTER_REGION = (2, 3, 4, 5, 6, 7)


def tiny_fedbiot_models() -> FedBiOTModels:
    """The tiny Llama-style model split FedBiOT-style with ``ADAPTER_REGION`` as the adapter,
    inside a fake Flower task context (strategies read its run id)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    model, tokenizer = tiny("tiny-llama")
    layout = fedbiot_layout(len(get_blocks(model)), len(ADAPTER_REGION), 0.5)
    assert layout.adapter_blocks == ADAPTER_REGION
    return FedBiOTModels(model, tokenizer, layout, LoraSpec(r=4, alpha=8))
