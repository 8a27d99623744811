"""Held-out evaluation kept per text, so that every number has an interval and every pair of
models is compared on the same texts.

One pass scores each text's response negative log-likelihood (for Banking77, the gold label's
NLL: a proper score, one short forward per text); label ranking, on the first ``ranked`` texts,
gives accuracy and macro-F1. A result keeps the per-text values, so a later model is compared
with the base on exactly these texts (paired bootstrap of the loss difference, McNemar for
accuracy).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedTokenizerBase

from models.label_ranking import LabelRanker, shared_prefix_length
from models.label_scores import label_token_ids
from models.progress import progress
from models.response_logits import IGNORE_INDEX, response_logits, response_positions
from server_app.evaluation.confidence import (
    paired_accuracy_difference,
    paired_ratio_difference,
    ratio,
    wilson,
)
from task_data import collate, tokenize_records
from task_data.formatting import prompt_ids


@dataclass
class HeldoutResult:
    """Per-text scores of one model: response NLL (nats) and response tokens for every text;
    the ranked label and the gold one for the ranked texts (none when not ranked)."""

    nll: list[float]
    tokens: list[int]
    predicted: list[str] = field(default_factory=list)
    gold: list[str] = field(default_factory=list)

    @property
    def correct(self) -> list[bool]:
        return [p == g for p, g in zip(self.predicted, self.gold, strict=True)]

    def summary(self, reference: HeldoutResult | None = None, seed: int = 0) -> dict[str, float]:
        """Metric name -> value: loss per response token with its interval; accuracy (Wilson)
        and macro-F1 when ranked; against ``reference`` (the base, on the same texts), the
        paired loss and accuracy differences with intervals and McNemar's p-value."""
        out = ratio(self.nll, self.tokens, seed).keys("loss")
        out["loss_examples"] = float(len(self.nll))
        if self.predicted:
            out.update(wilson(sum(self.correct), len(self.correct)).keys("accuracy"))
            out["accuracy_examples"] = float(len(self.correct))
            out["macro_f1"] = macro_f1(self.gold, self.predicted)
        if reference is None:
            return out
        if len(reference.nll) != len(self.nll):
            raise ValueError("the reference was scored on other texts")
        loss = paired_ratio_difference(
            (self.nll, self.tokens), (reference.nll, reference.tokens), seed
        )
        out.update(loss.keys("loss_vs_base"))
        if self.predicted and reference.predicted:
            accuracy = paired_accuracy_difference(self.correct, reference.correct, seed)
            out.update(accuracy.interval.keys("accuracy_vs_base"))
            out["accuracy_vs_base_p"] = accuracy.p_value
        return out

    def to_json(self) -> dict:
        return {
            "nll": self.nll,
            "tokens": self.tokens,
            "predicted": self.predicted,
            "gold": self.gold,
        }


def macro_f1(gold: list[str], predicted: list[str]) -> float:
    """Mean F1 over every label that occurs in gold or prediction (scikit-learn's default
    ``average='macro'``): a label the model predicts but never sees as gold counts as 0."""
    scores = []
    for label in sorted(set(gold) | set(predicted)):
        tp = sum(g == label == p for g, p in zip(gold, predicted, strict=True))
        fp = sum(g != label == p for g, p in zip(gold, predicted, strict=True))
        fn = sum(g == label != p for g, p in zip(gold, predicted, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / max(len(scores), 1)


class PrefixCache:
    """The key/value cache of the prompt prefix all held-out texts share (the chat template's
    system turn and the task's instruction), computed once: each batch then runs only its
    texts' own tokens, which for a short classification text is a third of the prompt."""

    def __init__(self, model: nn.Module, prefix: list[int]) -> None:
        self.length = len(prefix)
        self.config = getattr(model, "config", None)
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        if prefix:
            device = next(model.parameters()).device
            cache = DynamicCache(config=self.config)
            model(input_ids=torch.tensor([prefix], device=device), past_key_values=cache,
                  use_cache=True, logits_to_keep=1)  # fmt: skip
            self.layers = [(layer.keys, layer.values) for layer in cache.layers]

    def for_batch(self, rows: int) -> DynamicCache | None:
        """A fresh cache holding the prefix for ``rows`` texts (a forward appends to it)."""
        if not self.length:
            return None
        return DynamicCache(
            ddp_cache_data=[(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1))
                            for k, v in self.layers],
            config=self.config,
        )  # fmt: skip


@torch.no_grad()
def response_nll(
    model: nn.Module, batch: dict[str, torch.Tensor], prefix: PrefixCache | None = None
) -> tuple[list[float], list[int]]:
    """Per-row summed response NLL and response token count of one batch; with ``prefix``,
    the batch holds only what follows the shared prefix."""
    if prefix is None or not prefix.length:
        logits, targets = response_logits(model, batch)
    else:
        keep = response_positions(batch["labels"])
        rows, width = batch["input_ids"].shape
        mask = torch.ones(rows, prefix.length + width, dtype=batch["attention_mask"].dtype,
                          device=batch["attention_mask"].device)  # fmt: skip
        mask[:, prefix.length :] = batch["attention_mask"]
        positions = torch.arange(prefix.length, prefix.length + width, device=mask.device)
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=mask,
            position_ids=positions.expand(rows, -1),
            past_key_values=prefix.for_batch(rows),
            use_cache=True,
            logits_to_keep=keep,
        ).logits.reshape(-1, model.config.vocab_size)
        targets = batch["labels"][:, 1:][keep[:, :-1]]
    losses = F.cross_entropy(logits.float(), targets, reduction="none")
    counts = response_positions(batch["labels"]).sum(1).tolist()
    return [float(chunk.sum()) for chunk in losses.split(counts)], counts


def _prompt_length(labels: list[int]) -> int:
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


@torch.no_grad()
def score_records(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict[str, str]],
    seq_length: int,
    batch_size: int = 8,
    labels: list[str] | None = None,
    ranked: int = 0,
    description: str = "held-out",
) -> HeldoutResult:
    """Score ``records`` (response NLL), and rank ``labels`` for the first ``ranked`` ones
    (whose ``label`` field is the gold label)."""
    model.eval()
    device = next(model.parameters()).device
    examples = tokenize_records(tokenizer, records, seq_length)
    # The prefix every text shares stops before the first response token anywhere.
    prompts = [e["input_ids"][: _prompt_length(e["labels"])] for e in examples]
    shared = shared_prefix_length(prompts) if len(prompts) > 1 else 0
    prefix = PrefixCache(model, examples[0]["input_ids"][:shared]) if shared else None
    examples = [{k: v[shared:] for k, v in e.items()} for e in examples]
    # Batches of similar length waste less on padding; results go back in record order.
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    nll, tokens = [0.0] * len(examples), [0] * len(examples)
    starts = range(0, len(order), batch_size)
    for start in progress(list(starts), description):
        rows = order[start : start + batch_size]
        batch = collate([examples[i] for i in rows], tokenizer.pad_token_id)
        sums, counts = response_nll(model, {k: v.to(device) for k, v in batch.items()}, prefix)
        for row, value, count in zip(rows, sums, counts, strict=True):
            nll[row], tokens[row] = value, count
    result = HeldoutResult(nll, tokens)
    if labels and ranked:
        texts = records[:ranked]
        prompts = [prompt_ids(tokenizer, r) for r in texts]
        ranker = LabelRanker(
            model,
            label_token_ids(tokenizer, labels),
            prompts[0][: shared_prefix_length(prompts)],
        )
        for prompt, record in zip(progress(prompts, f"{description} ranking"), texts, strict=True):
            if record.get("label") not in labels:
                raise ValueError(
                    f"held-out record {record.get('input', '')[:60]!r} has label "
                    f"{record.get('label')!r}, which is not one of the {len(labels)} labels"
                )
            best, _ = ranker.rank(prompt, labels.index(record["label"]))
            result.predicted.append(labels[best])
            result.gold.append(record["label"])
    return result
