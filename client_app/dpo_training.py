"""The client's DPO step (the scoring it shares with the server: federation/preferences.py).

Batches come from ``task_data.collate_pairs``: 2B rows, the B chosen answers then the B
rejected ones, so one forward pass scores a whole batch of pairs. The DPO reference is the
model as the client received it this round (run config ``dpo-reference='round'``) or the
model at the start of DPO, whose LoRA the server sends every DPO round (``'fixed'``,
OpenFedLLM's choice: the anchor does not drift over the DPO rounds). Its log-probs are taken
once, before the first update.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from federation.local_training import lora_steps
from federation.preferences import dpo_loss, reference_logps, reward_accuracy, sequence_logps
from models.lora import LoraModel


@dataclass
class DPOResult:
    """What a client reports about its local DPO (means over its steps)."""

    loss: float
    accuracy: float
    margin: float
    tokens: int
    seconds: float


def train_dpo(
    lora: LoraModel,
    blocks: Iterable[int],
    batches: Iterator[dict[str, torch.Tensor]],
    steps: int,
    learning_rate: float,
    beta: float = 0.1,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    reference_state: dict[str, torch.Tensor] | None = None,
    accum_steps: int = 1,
) -> DPOResult:
    """Train only the LoRA of ``blocks`` for ``steps`` DPO steps on pair batches, each step
    on ``accum_steps`` batches (the mean loss over all their pairs).

    The ``steps * accum_steps`` batches are drawn up front and scored by the reference: the model as
    received, or with ``reference_state`` (every LoRA parameter, by name) loaded in its
    place, after which the received LoRA is put back. Dropout stays off throughout (trl's
    ``disable_dropout`` default): the reward compares two log-probs of the same sequence,
    and dropout noise in one biases it. So with the received reference the first step's
    policy equals it exactly (loss log 2, margin 0).
    """
    blocks = tuple(blocks)
    drawn = [next(batches) for _ in range(steps * accum_steps)]
    if reference_state is None:
        references = reference_logps(lora, drawn)
    else:
        missing = sorted(set(lora.params()) - set(reference_state))
        if missing:
            raise ValueError(f"the DPO reference lacks LoRA parameters {missing[:3]}")
        received = lora.state()
        lora.load_state(reference_state)
        references = reference_logps(lora, drawn)
        lora.load_state(received)
    model = lora.peft
    model.eval()
    loss_total, accuracy_total, margin_total, tokens = 0.0, 0.0, 0.0, 0
    start = time.perf_counter()
    with lora_steps(lora, blocks, learning_rate, weight_decay, max_grad_norm) as update:
        for start in range(0, len(drawn), accum_steps):
            micro = range(start, start + accum_steps)
            pairs = sum(drawn[i]["labels"].shape[0] // 2 for i in micro)
            step_margins = []
            for i in micro:
                batch = {k: v.to(lora.device) for k, v in drawn[i].items()}
                logps = sequence_logps(model, batch)
                losses, margins = dpo_loss(logps, references[i].to(lora.device), beta)
                share = losses.sum() / pairs  # the step's mean over all its pairs
                if i < micro[-1]:
                    update.accumulate(share)
                else:
                    update.step(share)
                loss_total += share.item()
                step_margins.append(margins.detach())
                tokens += int(drawn[i]["attention_mask"].sum())
            margins = torch.cat(step_margins)
            accuracy_total += reward_accuracy(margins).item()
            margin_total += margins.mean().item()
    return DPOResult(
        loss=loss_total / max(steps, 1),
        accuracy=accuracy_total / max(steps, 1),
        margin=margin_total / max(steps, 1),
        tokens=tokens,
        seconds=time.perf_counter() - start,
    )
