"""KD-FedLLM's public data set, the soft labels computed on it, and training against them.

Server and clients build the same public set from the run config alone, in the same order,
so a payload's rows need no ids on the wire. Two kinds:

* classification (``task = banking77``): per public text, the log-probabilities of the 77
  labels (``models/label_scores``), a dense (N, 77) payload. The public texts are Banking77
  test-split texts that the server's evaluation never reads (neither its loss subset nor its
  accuracy subset), without their labels: every training text is some client's private data.
* generation (any other task): the ``public-data`` records (e.g. GPTeacher), the top-k token
  log-probabilities at each response position (``kd-topk``), so an upload costs
  ``positions * k * 6`` bytes whatever the vocabulary.

Values travel as fp16, the width of the probabilities a KD loss can use. A KD step takes
one chunk of the public set: ``batch-size`` records for generation, one text for
classification (scoring its C labels is already a batch of C continuations).
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from flwr.app import ArrayRecord
from torch import nn
from transformers import PreTrainedTokenizerBase

from federation.run_choices import parse_tasks
from federation.run_config import ConfigError, RunConfig
from models.kd_logits import (
    VALUE_DTYPES,
    Payload,
    TopKTargets,
    dense_pack,
    kd_loss,
    topk_pack,
    topk_unpack,
)
from models.label_scores import label_log_likelihoods, label_token_ids
from models.lora import LoraModel
from models.response_logits import response_lm_loss, response_logits, response_positions
from models.wire import from_record, to_record
from task_data import collate, load_records, tokenize_records
from task_data.formatting import prompt_ids
from task_data.sources import default_data_dir
from task_data.validation import heldout_test_indices, subset

CLASSIFICATION_TASKS = ("banking77",)
WIRE_DTYPE = "fp16"
SOFT_LABELS = "soft-labels"  # the record that carries a payload, both ways
Targets = torch.Tensor | TopKTargets


@dataclass(frozen=True)
class PublicSet:
    """Fixed chunks of the public set; ``rows[i]`` payload rows come from chunk ``i``."""

    chunks: tuple[list[list[int]] | dict[str, torch.Tensor], ...]
    rows: tuple[int, ...]
    labels: tuple[list[int], ...] = ()  # label token ids: classification only

    @property
    def classification(self) -> bool:
        return bool(self.labels)

    @property
    def examples(self) -> int:
        """Public examples (texts) in the set."""
        return sum(len(c) if isinstance(c, list) else len(c["input_ids"]) for c in self.chunks)

    def offsets(self, chunk: int) -> slice:
        start = sum(self.rows[:chunk])
        return slice(start, start + self.rows[chunk])


def _unread_test_records(config: RunConfig) -> list[dict]:
    """Test records the server's evaluation of this run never reads."""
    test = config.task_records("test")
    used = set()
    if config.resolved_eval_split == "test":
        used = set(heldout_test_indices(len(test), config.eval_examples))
    tasks = parse_tasks(config.eval_tasks, config.task)
    if config.task in tasks or "perplexity" in tasks:  # both draw the same fixed subset
        used |= set(subset(list(range(len(test))), config.eval_generation_examples, config.seed))
    return [r for i, r in enumerate(test) if i not in used]


@lru_cache(maxsize=2)
def public_set(config: RunConfig, tokenizer: PreTrainedTokenizerBase) -> PublicSet:
    """The run's public set (memoized: simulated clients ask for it every round)."""
    size, batch = config.kd_public_examples, config.batch_size
    if config.task in CLASSIFICATION_TASKS:
        records = _unread_test_records(config)
        if not records:
            raise ConfigError(
                "run-config method=kdfed: the evaluation reads every test text of "
                f"{config.task}, none is left as public data; lower eval-generation-examples"
            )
        random.Random(config.seed).shuffle(records)
        prompts = [prompt_ids(tokenizer, r)[-config.seq_length :] for r in records[:size]]
        root = Path(config.data_dir) if config.data_dir else default_data_dir()
        names = json.loads((root / config.task / "categories.json").read_text())
        chunks = [[p] for p in prompts]  # one text already scores a batch of C labels
        return PublicSet(
            chunks=tuple(chunks),
            rows=tuple(len(c) for c in chunks),
            labels=tuple(label_token_ids(tokenizer, names)),
        )
    key = "run-config public-data"
    records = load_records(config.public_data, data_dir=config.data_dir or None, key=key)
    random.Random(config.seed).shuffle(records)
    examples = tokenize_records(tokenizer, records[:size], config.seq_length)
    chunks = [
        collate(examples[i : i + batch], tokenizer.pad_token_id)
        for i in range(0, len(examples), batch)
    ]
    rows = tuple(int(response_positions(c["labels"]).sum()) for c in chunks)
    return PublicSet(chunks=tuple(chunks), rows=rows)


def chunk_scores(model: nn.Module, public: PublicSet, chunk: int) -> torch.Tensor:
    """The model's scores on one chunk: (n, C) label log-likelihoods or (positions, V)
    response logits; with a graph when gradients are enabled."""
    if public.classification:
        return label_log_likelihoods(model, public.chunks[chunk], list(public.labels))
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in public.chunks[chunk].items()}
    return response_logits(model, batch)[0]


@torch.no_grad()
def soft_labels(model: nn.Module, public: PublicSet, temperature: float, k: int) -> Payload:
    """What a client uploads: its soft labels on the whole public set, in fp16."""
    model.eval()
    parts = [chunk_scores(model, public, i) for i in range(len(public.chunks))]
    if public.classification:
        return dense_pack(torch.cat(parts), temperature, WIRE_DTYPE)
    packed = [topk_pack(p, None, min(k, p.shape[-1]), temperature, WIRE_DTYPE) for p in parts]
    return torch.cat([v for v, _ in packed]), torch.cat([i for _, i in packed])


def to_targets(payload: Payload) -> Targets:
    """Teacher log-probs (dense) or the top-k probabilities with their other bucket."""
    return payload if isinstance(payload, torch.Tensor) else topk_unpack(*payload)


def _chunk_targets(targets: Targets, public: PublicSet, chunk: int) -> Targets:
    rows = public.offsets(chunk)
    if isinstance(targets, TopKTargets):
        return TopKTargets(targets.probs[rows], targets.indices[rows])
    return targets[rows]


def payload_record(payload: Payload) -> ArrayRecord:
    """The payload as an ArrayRecord: ``values`` and, for top-k, ``indices`` (int32)."""
    if isinstance(payload, torch.Tensor):
        return to_record({"values": payload})
    return to_record({"values": payload[0], "indices": payload[1]})


def record_payload(record: ArrayRecord) -> Payload:
    """Inverse of ``payload_record``."""
    arrays = from_record(record)
    return arrays["values"] if "indices" not in arrays else (arrays["values"], arrays["indices"])


def payload_problem(
    record: ArrayRecord | None, public: PublicSet, k: int, vocab: int
) -> str | None:
    """Why a client's soft-labels record is not what the server can average with the others
    for ``public``, or None: fp16 label log-probs (texts, labels) for classification; else
    top-``min(k, vocab)`` fp16 log-probs with distinct int token ids below ``vocab`` for every
    response position; all finite, log-probs at most 0 and a row's kept probability at most
    1. A reply crosses a boundary: a wrong shape or repeated ids would end the round's
    aggregation, a token id past the vocabulary the distillation, and probabilities above 1
    would skew everybody's targets."""
    if record is None:
        return f"no {SOFT_LABELS!r} record"
    names = sorted(record)
    if names != (["values"] if public.classification else ["indices", "values"]):
        return f"{SOFT_LABELS} arrays {names}"
    wire = {"values": (VALUE_DTYPES[WIRE_DTYPE],), "indices": (torch.int32, torch.int64)}
    for name in names:
        allowed = [str(d).removeprefix("torch.") for d in wire[name]]
        if record[name].dtype not in allowed:
            return f"{SOFT_LABELS} {name} of dtype {record[name].dtype}, expected {allowed}"
    try:
        arrays = from_record(record)
    except ValueError as error:  # NaN or Inf, or bytes that are not their declared array
        return f"{SOFT_LABELS}: {error}"
    values, rows = arrays["values"], sum(public.rows)
    shape = (rows, len(public.labels) if public.classification else min(k, vocab))
    if tuple(values.shape) != shape:
        return f"{SOFT_LABELS} values of shape {list(values.shape)}, expected {list(shape)}"
    if values.numel() == 0:
        return None
    if not torch.isfinite(values).all() or values.max() > 1e-3:
        return f"{SOFT_LABELS} values are not finite log-probabilities"
    if public.classification:
        return None
    indices = arrays["indices"]
    if tuple(indices.shape) != shape:
        return f"{SOFT_LABELS} indices of shape {list(indices.shape)}, expected {list(shape)}"
    if indices.min() < 0 or indices.max() >= vocab:
        return f"{SOFT_LABELS} token ids outside [0, {vocab})"
    if (indices.sort(-1).values.diff(dim=-1) == 0).any():
        return f"{SOFT_LABELS}: a position lists a token id twice"
    if values.float().exp().sum(-1).max() > 1.01:
        return f"{SOFT_LABELS}: a row's kept probability exceeds 1"
    return None


@dataclass
class KdResult:
    """Mean losses of ``kd_steps`` and the time they took."""

    loss: float
    task_loss: float
    kd_loss: float
    seconds: float


def kd_steps(
    lora: LoraModel,
    optimizer: torch.optim.Optimizer,
    steps: int,
    public: PublicSet,
    targets: Targets | None,
    temperature: float,
    kd_weight: float,
    task_batches: Iterator[dict[str, torch.Tensor]] | None = None,
    first_chunk: int = 0,
) -> KdResult:
    """``steps`` steps of ``(1 - w) * task + w * KL`` on all of ``lora``'s LoRA.

    The KL term compares the model with ``targets`` on public chunk ``first_chunk + step``
    (cycling). Without targets (a client's first round) the loss is the task loss alone, at
    full weight; without task batches (the server's distillation) it is the KL alone.
    """
    params = lora.train_only(sorted({m.block for m in lora.modules.values()}))
    lora.peft.train()
    sums = {"loss": 0.0, "task_loss": 0.0, "kd_loss": 0.0}
    weight = kd_weight if task_batches is not None else 1.0
    start = time.perf_counter()
    for step in range(steps):
        loss = torch.zeros((), device=lora.device)
        if task_batches is not None:
            batch = {k: v.to(lora.device) for k, v in next(task_batches).items()}
            task = response_lm_loss(lora.peft, batch)
            loss = task * (1.0 - weight if targets is not None else 1.0)
            sums["task_loss"] += task.item()
        if targets is not None and weight > 0:
            chunk = (first_chunk + step) % len(public.chunks)
            scores = chunk_scores(lora.peft, public, chunk)
            kd = kd_loss(scores, _chunk_targets(targets, public, chunk), None, temperature)
            loss = loss + weight * kd
            sums["kd_loss"] += kd.item()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sums["loss"] += loss.item()
    lora.peft.eval()
    for p in params:
        p.requires_grad_(False)
    mean = {k: v / max(steps, 1) for k, v in sums.items()}
    return KdResult(seconds=time.perf_counter() - start, **mean)
