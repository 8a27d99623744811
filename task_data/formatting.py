"""Chat-template formatting with the loss on response tokens only, and batching."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
MIN_RESPONSE_TOKENS = 8
PLAIN_PROMPT = "### Instruction:\n{}\n\n### Response:\n"


def user_text(record: dict[str, str]) -> str:
    """The user turn: instruction, then the input if there is one."""
    extra = record.get("input", "")
    return f"{record['instruction']}\n\n{extra}" if extra else record["instruction"]


def prompt_ids(tokenizer: PreTrainedTokenizerBase, record: dict[str, str]) -> list[int]:
    """Token ids of the prompt, through the chat template when the tokenizer has one."""
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text(record)}],
            add_generation_prompt=True,
            tokenize=True,
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    return tokenizer(PLAIN_PROMPT.format(user_text(record)), add_special_tokens=True)["input_ids"]


def tokenize_record(
    tokenizer: PreTrainedTokenizerBase, record: dict[str, str], seq_length: int
) -> dict[str, list[int]]:
    """``input_ids``, ``labels`` (-100 on the prompt) and ``attention_mask``.

    Long examples lose the end of the response; a prompt that alone fills the window loses
    its beginning instead, so at least a few response tokens stay to learn from.
    """
    prompt = prompt_ids(tokenizer, record)
    response = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
    response = [*response, tokenizer.eos_token_id]
    keep_response = min(len(response), MIN_RESPONSE_TOKENS)
    if len(prompt) + keep_response > seq_length:
        prompt = prompt[len(prompt) + keep_response - seq_length :]
    response = response[: seq_length - len(prompt)]
    return {
        "input_ids": prompt + response,
        "labels": [IGNORE_INDEX] * len(prompt) + response,
        "attention_mask": [1] * (len(prompt) + len(response)),
    }


def tokenize_records(
    tokenizer: PreTrainedTokenizerBase, records: list[dict[str, str]], seq_length: int
) -> list[dict[str, list[int]]]:
    return [tokenize_record(tokenizer, r, seq_length) for r in records]


def collate(examples: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example (labels with -100, attention with 0)."""
    width = max(len(e["input_ids"]) for e in examples)

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.tensor([e[key] + [value] * (width - len(e[key])) for e in examples])

    return {
        "input_ids": pad("input_ids", pad_token_id),
        "labels": pad("labels", IGNORE_INDEX),
        "attention_mask": pad("attention_mask", 0),
    }


def batch_iterator(
    examples: list[Any],
    batch_size: int,
    seed: int,
    pad_token_id: int,
    collate_fn: Callable[[list[Any], int], dict[str, torch.Tensor]] = collate,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches: clients run a number of steps, not epochs."""
    if not examples:
        raise ValueError("no examples to batch")
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        if len(order) < batch_size:
            fresh = list(range(len(examples)))
            rng.shuffle(fresh)
            order += fresh
        chosen, order = order[:batch_size], order[batch_size:]
        yield collate_fn([examples[i] for i in chosen], pad_token_id)
