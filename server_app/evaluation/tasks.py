"""Task evaluators. Each takes a model, its tokenizer, a sample size and a seed, and returns
``{metric: value}``; a per-round evaluation uses the same small fixed subset every time."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from models.label_scores import label_log_likelihoods, label_token_ids
from models.progress import progress
from models.response_logits import response_logits
from server_app.evaluation.answers import extract_answer
from server_app.evaluation.generation import chat_prompt, generate
from server_app.evaluation.heldout import macro_f1
from task_data import USUAL_COLUMNS, Columns, collate, load_records, tokenize_records
from task_data.sources import default_data_dir
from task_data.validation import subset

GSM8K_ZERO_SHOT = '{question}\nSolve it step by step and end with "The answer is N".'
GSM8K_SHOT = "Question: {question}\nAnswer: {answer}\n\n"


def gsm8k(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    size: int,
    seed: int,
    shots: int = 0,
    max_new_tokens: int = 256,
    data_dir: str | None = None,
) -> dict[str, float]:
    """Exact match of the extracted final answer, zero- or few-shot chain of thought."""
    test = subset(load_records("gsm8k", "test", data_dir=data_dir), size, seed)
    examples = random.Random(seed + 1).sample(
        load_records("gsm8k", "train", data_dir=data_dir), shots
    )
    prefix = "".join(
        GSM8K_SHOT.format(
            question=e["instruction"], answer=e["output"].replace("####", "The answer is")
        )
        for e in examples
    )
    prompts = [
        chat_prompt(tokenizer, prefix + GSM8K_ZERO_SHOT.format(question=r["instruction"]))
        for r in test
    ]
    outputs = generate(model, tokenizer, prompts, max_new_tokens, description="gsm8k")
    predicted = [extract_answer(out) for out in outputs]
    correct = [
        guess is not None and guess == extract_answer(r["output"])
        for guess, r in zip(predicted, test, strict=True)
    ]
    return {"accuracy": sum(correct) / max(len(correct), 1), "examples": len(correct)}


def _normalize_label(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.strip().lower()).strip("_")


@torch.no_grad()
def banking77(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    size: int,
    seed: int,
    mode: str = "generate",
    data_dir: str | None = None,
) -> dict[str, float]:
    """Intent accuracy and macro-F1 of the generated label (``generate``), or of the label the
    model ranks most likely (``rank``: never off the label set, so a briefly trained model
    scores above chance where its free text does not yet match a label name)."""
    root = Path(data_dir) if data_dir else default_data_dir()
    labels = json.loads((root / "banking77" / "categories.json").read_text())
    test = subset(load_records("banking77", "test", data_dir=data_dir), size, seed)
    prompts = [chat_prompt(tokenizer, f"{r['instruction']}\n\n{r['input']}") for r in test]
    if mode == "rank":
        # The label the model gives the highest log-likelihood, scored as the response it is
        # trained on (label tokens then EOS): the score KD-FedLLM's clients upload.
        candidates = label_token_ids(tokenizer, labels)
        predicted = []
        with torch.no_grad():
            for prompt in progress(prompts, "banking77"):
                scores = label_log_likelihoods(model, [prompt], candidates)[0]
                predicted.append(labels[int(scores.argmax())])
    elif mode == "generate":
        known = {_normalize_label(label): label for label in labels}
        outputs = generate(model, tokenizer, prompts, 16, description="banking77")
        predicted = [
            known.get(_normalize_label(o.splitlines()[0] if o else ""), o) for o in outputs
        ]
    else:
        raise ValueError(f"banking77 mode must be 'generate' or 'rank', not {mode!r}")
    gold = [r["label"] for r in test]
    accuracy = sum(g == p for g, p in zip(gold, predicted, strict=True)) / max(len(gold), 1)
    return {"accuracy": accuracy, "macro_f1": macro_f1(gold, predicted), "examples": len(gold)}


def perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    task: str,
    size: int,
    seed: int,
    seq_length: int = 512,
    batch_size: int = 4,
    data_dir: str | None = None,
    split: str = "train",
    columns: Columns = USUAL_COLUMNS,
    hub_subset: str = "",
) -> dict[str, float]:
    """exp(mean cross-entropy per response token) on the task's held-out split (the shipped
    test split; else ``split`` of configuration ``hub_subset``, read through ``columns``)."""
    split = "test" if task in ("gsm8k", "banking77") else split
    records = load_records(task, split, data_dir, columns, "task", hub_subset)
    records = subset(records, size, seed)
    examples = tokenize_records(tokenizer, records, seq_length)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], tokenizer.pad_token_id)
            logits, targets = response_logits(model, {k: v.to(device) for k, v in batch.items()})
            total += F.cross_entropy(logits.float(), targets, reduction="sum").item()
            count += targets.numel()
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}
