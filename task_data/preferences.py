"""Preference pairs for DPO: loading (HH-RLHF, own files, folders, hub ids), splitting,
tokenizing.

A pair is a prompt (chat messages ending with a user turn) and two assistant answers,
``chosen`` and ``rejected``. Tokenized, each side is an ordinary SFT example (prompt masked
with -100), so the pair runs through the same response-only log-prob code as SFT.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from functools import lru_cache
from logging import INFO
from pathlib import Path
from typing import TypedDict

import torch
from flwr.common.logger import log
from transformers import PreTrainedTokenizerBase

from task_data.formatting import (
    IGNORE_INDEX,
    MIN_RESPONSE_TOKENS,
    PLAIN_PROMPT,
    LazyTokenized,
    batch_iterator,
    collate,
)
from task_data.sources import DataError, default_data_dir, json_rows, read_field, where_of
from task_data.tables import JSON_SUFFIXES, TABLE_SUFFIXES, looks_like_hub_id, table_rows

HH_RLHF = "hh-rlhf"
_HH_FILE = Path("hh_rlhf") / "harmless-base-test.jsonl.gz"
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
# A turn marker starts a line; HH separates turns with "\n\n", a few rows with "\n" or spaces.
_HH_TURN = re.compile(r"^[ \t]*(Human|Assistant):", re.MULTILINE)
_ROLES = ("system", "user", "assistant")


class Message(TypedDict):
    role: str
    content: str


class PreferencePair(TypedDict):
    """A prompt and two answers; a dict, so partition_records and train_test_split take it."""

    prompt: list[Message]
    chosen: str
    rejected: str


def parse_hh_dialogue(text: str, where: str = "dialogue") -> list[Message]:
    """``"\\n\\nHuman: … \\n\\nAssistant: …"`` as chat messages (user/assistant).

    Consecutive turns of one speaker (a few HH rows repeat "Assistant:") are merged, so roles
    alternate as chat templates require. ``where`` (file and line) prefixes any error.
    """
    pieces = _HH_TURN.split(text)
    if len(pieces) < 3:
        raise DataError(f"{where}: no 'Human:' or 'Assistant:' turn")
    if pieces[0].strip():
        raise DataError(f"{where}: text before the first turn: {pieces[0].strip()[:40]!r}")
    if pieces[1] != "Human":
        raise DataError(f"{where}: the dialogue must start with a 'Human:' turn")
    messages: list[Message] = []
    for speaker, content in zip(pieces[1::2], pieces[2::2], strict=True):
        role, content = _HH_ROLES[speaker], content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] = "\n\n".join(
                c for c in (messages[-1]["content"], content) if c
            )
        else:
            messages.append({"role": role, "content": content})
    return messages


def _keep(pair: PreferencePair, skipped: Counter[str]) -> bool:
    """Pairs with an empty or no-difference answer carry no preference: count them instead."""
    if not pair["chosen"].strip() or not pair["rejected"].strip():
        skipped["empty answer"] += 1
        return False
    if pair["chosen"] == pair["rejected"]:
        skipped["identical answers"] += 1
        return False
    return True


def load_hh_rlhf(path: Path) -> tuple[list[PreferencePair], Counter[str]]:
    """Pairs of an HH-RLHF file (rows of full ``chosen``/``rejected`` dialogues).

    The prompt is the history before the final assistant turn; rows whose two histories differ
    (a few HH rows) are skipped, as are empty or identical answers. Returns the pairs and the
    skipped rows counted by reason.
    """
    pairs: list[PreferencePair] = []
    skipped: Counter[str] = Counter()
    for n, row in json_rows(path):
        sides = {}
        for side in ("chosen", "rejected"):
            where = f"{where_of(path, n)} field {side!r}"
            messages = parse_hh_dialogue(read_field(where_of(path, n), row, side), where)
            if messages[-1]["role"] != "assistant":
                raise DataError(f"{where}: the dialogue must end with an 'Assistant:' turn")
            sides[side] = messages
        prompt = sides["chosen"][:-1]
        if prompt != sides["rejected"][:-1]:
            skipped["histories differ"] += 1
            continue
        pair: PreferencePair = {
            "prompt": prompt,
            "chosen": sides["chosen"][-1]["content"],
            "rejected": sides["rejected"][-1]["content"],
        }
        if _keep(pair, skipped):
            pairs.append(pair)
    return pairs, skipped


def _prompt(at: str, row: object) -> list[Message]:
    """A string prompt is one user turn; a list must be role/content messages ending with a
    user turn (the answers follow it). ``at`` (source and line or row) prefixes errors."""
    if not isinstance(row, dict):
        raise DataError(f"{at}: expected an object, got {type(row).__name__}")
    if row.get("prompt") is None:
        raise DataError(f"{at}: missing field 'prompt'")
    where, value = f"{at} field 'prompt'", row["prompt"]
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: expected a non-empty string or list of messages")
    messages: list[Message] = []
    for i, message in enumerate(value):
        ok = isinstance(message, dict) and message.get("role") in _ROLES
        if not ok or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: message {i} needs a role in {_ROLES} and a string content")
        messages.append({"role": message["role"], "content": message["content"]})
    if messages[-1]["role"] != "user":
        raise DataError(f"{where}: the last message must be a user turn")
    return messages


def _pairs(rows: Iterator[tuple[str, object]]) -> tuple[list[PreferencePair], Counter[str]]:
    """Pairs of ``(where, row)`` rows with ``prompt``, ``chosen``, ``rejected``."""
    pairs: list[PreferencePair] = []
    skipped: Counter[str] = Counter()
    for where, row in rows:
        pair: PreferencePair = {
            "prompt": _prompt(where, row),
            "chosen": read_field(where, row, "chosen"),
            "rejected": read_field(where, row, "rejected"),
        }
        if _keep(pair, skipped):
            pairs.append(pair)
    return pairs, skipped


def load_preference_file(path: Path) -> tuple[list[PreferencePair], Counter[str]]:
    """Pairs of a JSON list or (gzipped) JSONL file with ``prompt``, ``chosen``, ``rejected``.

    ``prompt`` is a string or a list of ``{role, content}`` messages. Returns the pairs and the
    skipped (empty or identical answer) rows counted by reason.
    """
    return _pairs((where_of(path, n), row) for n, row in json_rows(path))


def load_preference_table(name: str) -> tuple[list[PreferencePair], Counter[str]]:
    """Pairs of the 'train' split of a CSV/Parquet file, a folder or a hub id, with the
    columns of a preference file."""
    _, rows = table_rows(name, "train")
    return _pairs((f"{name} row {n}", row) for n, row in enumerate(rows, start=1))


@lru_cache(maxsize=4)
def _load(name: str, data_dir: str) -> tuple[PreferencePair, ...]:
    if name == HH_RLHF:
        path = Path(data_dir) / _HH_FILE
        pairs, skipped = load_hh_rlhf(path)
    elif name.endswith(JSON_SUFFIXES):
        path = Path(name).expanduser()
        pairs, skipped = load_preference_file(path)
    elif (
        Path(name).expanduser().exists()
        or name.endswith(tuple(TABLE_SUFFIXES))
        or looks_like_hub_id(name)
    ):
        path = Path(name)
        pairs, skipped = load_preference_table(name)
    else:
        raise DataError(
            f"unknown preference data {name!r}: use {HH_RLHF!r}, a file "
            f"({', '.join((*JSON_SUFFIXES, *TABLE_SUFFIXES))}) or folder of prompt/chosen/"
            "rejected records, or a hub id owner/name"
        )
    if not pairs:
        raise DataError(f"{path}: no usable preference pairs (skipped: {dict(skipped)})")
    if skipped:
        log(INFO, "%s: %d pairs, skipped %s", path, len(pairs), dict(skipped))
    return tuple(pairs)


def load_preferences(
    name_or_path: str, data_dir: str | Path | None = None, key: str = ""
) -> list[PreferencePair]:
    """Pairs of the shipped HH-RLHF harmless-base set (``"hh-rlhf"``), a file, a folder or a
    hub id (cached per process; skipped rows are logged). ``key`` prefixes errors."""
    root = Path(data_dir) if data_dir else default_data_dir()
    try:
        pairs = _load(name_or_path, str(root))
    except DataError as error:
        raise DataError(f"{key}={name_or_path!r}: {error}" if key else str(error)) from None
    return [
        {
            "prompt": [{"role": m["role"], "content": m["content"]} for m in p["prompt"]],
            "chosen": p["chosen"],
            "rejected": p["rejected"],
        }
        for p in pairs
    ]


def split_preferences(
    pairs: list[PreferencePair], held_out_fraction: float, seed: int
) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """Deterministic (train, held-out) split that keeps pairs opening with the same user turn
    together: HH has many dialogues that start alike, and a held-out prompt seen in training
    would overstate preference accuracy. The held-out part has at least one pair when possible."""
    groups: dict[str, list[int]] = {}
    for i, pair in enumerate(pairs):
        groups.setdefault(pair["prompt"][0]["content"], []).append(i)
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    wanted = max(1, round(held_out_fraction * len(pairs))) if len(keys) > 1 else 0
    held_out: list[int] = []
    for key in keys:
        if len(held_out) >= wanted:
            break
        held_out += groups[key]
    taken = set(held_out)
    return [p for i, p in enumerate(pairs) if i not in taken], [pairs[i] for i in held_out]


def prompt_message_ids(tokenizer: PreTrainedTokenizerBase, messages: list[Message]) -> list[int]:
    """Token ids of a chat prompt up to the assistant's turn. Without a chat template, the plain
    format of SFT: a single user turn as is, a longer history as a role-labelled transcript."""
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    if len(messages) == 1:
        text = messages[0]["content"]
    else:
        text = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
    return tokenizer(PLAIN_PROMPT.format(text), add_special_tokens=True)["input_ids"]


def tokenize_pair(
    tokenizer: PreTrainedTokenizerBase, pair: PreferencePair, seq_length: int
) -> dict[str, dict[str, list[int]]]:
    """``{"chosen": example, "rejected": example}``, each with ``input_ids``, ``labels`` (-100
    on the prompt, the answer and EOS after it) and ``attention_mask``.

    Truncation follows ``tokenize_record``: answers lose their end; a prompt that would leave
    fewer than a few answer tokens loses its beginning. Both sides keep the same prompt tokens,
    so the pair differs only in the answer, as DPO assumes.
    """
    prompt = prompt_message_ids(tokenizer, pair["prompt"])
    answers = {
        side: [
            *tokenizer(pair[side], add_special_tokens=False)["input_ids"],
            tokenizer.eos_token_id,
        ]
        for side in ("chosen", "rejected")
    }
    keep = max(min(len(a), MIN_RESPONSE_TOKENS) for a in answers.values())
    if len(prompt) + keep > seq_length:
        prompt = prompt[len(prompt) + keep - seq_length :]
    out = {}
    for side, answer in answers.items():
        answer = answer[: seq_length - len(prompt)]
        out[side] = {
            "input_ids": prompt + answer,
            "labels": [IGNORE_INDEX] * len(prompt) + answer,
            "attention_mask": [1] * (len(prompt) + len(answer)),
        }
    return out


def tokenize_pairs(
    tokenizer: PreTrainedTokenizerBase, pairs: list[PreferencePair], seq_length: int
) -> list[dict[str, dict[str, list[int]]]]:
    return [tokenize_pair(tokenizer, p, seq_length) for p in pairs]


def lazy_tokenized_pairs(
    tokenizer: PreTrainedTokenizerBase, pairs: Sequence[PreferencePair], seq_length: int
) -> LazyTokenized[PreferencePair, dict[str, dict[str, list[int]]]]:
    """``tokenize_pairs``, each pair on first access (as ``lazy_tokenized_records``)."""
    return LazyTokenized(pairs, lambda pair: tokenize_pair(tokenizer, pair, seq_length))


def collate_pairs(
    examples: list[dict[str, dict[str, list[int]]]], pad_token_id: int
) -> dict[str, torch.Tensor]:
    """One padded batch of 2B rows, the B chosen sides then the B rejected sides: one forward
    pass scores both."""
    return collate(
        [e["chosen"] for e in examples] + [e["rejected"] for e in examples], pad_token_id
    )


def pair_batch_iterator(
    examples: Sequence[dict[str, dict[str, list[int]]]],
    batch_size: int,
    seed: int,
    pad_token_id: int,
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled pair batches (``batch_size`` pairs, 2x rows): clients run steps."""
    if not examples:
        raise ValueError("no preference pairs to batch")
    return batch_iterator(examples, batch_size, seed, pad_token_id, collate_pairs)
