"""Chat-template formatting with the loss on response tokens only, and batching."""

from __future__ import annotations

import operator
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, TypeVar, overload

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
MIN_RESPONSE_TOKENS = 8
PLAIN_PROMPT = "### Instruction:\n{}\n\n### Response:\n"

Raw = TypeVar("Raw")
Tokenized = TypeVar("Tokenized")


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


class LazyTokenized(Sequence[Tokenized], Generic[Raw, Tokenized]):
    """``items``, each tokenized on its first access and kept. A client trains on steps x
    batch examples a round; tokenizing its whole partition up front (the chat template costs
    about a millisecond a text) took seconds in every process, and a deployed SuperNode starts
    one per message, so every round."""

    def __init__(self, items: Sequence[Raw], tokenize: Callable[[Raw], Tokenized]) -> None:
        self._items = items
        self._tokenize = tokenize
        self._done: dict[int, Tokenized] = {}

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, index: int) -> Tokenized: ...

    @overload
    def __getitem__(self, index: slice) -> list[Tokenized]: ...

    def __getitem__(self, index: int | slice) -> Tokenized | list[Tokenized]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = operator.index(index)
        i = i + len(self) if i < 0 else i
        if not 0 <= i < len(self):
            raise IndexError(f"index {index} out of {len(self)} examples")
        if i not in self._done:
            self._done[i] = self._tokenize(self._items[i])
        return self._done[i]


def lazy_tokenized_records(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[dict[str, str]], seq_length: int
) -> LazyTokenized[dict[str, str], dict[str, list[int]]]:
    """``tokenize_records``, each record on first access."""
    return LazyTokenized(records, lambda record: tokenize_record(tokenizer, record, seq_length))


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
    examples: Sequence[Any],
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
