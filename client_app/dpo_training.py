"""The client's DPO step, and preference metrics against a fixed reference.

Batches come from ``task_data.collate_pairs``: 2B rows, the B chosen answers then the B
rejected ones, so one forward pass scores a whole batch of pairs. The DPO reference is the
model as the client received it this round (run config ``dpo-reference='round'``) or the
model at the start of DPO, whose LoRA the server sends every DPO round (``'fixed'``,
OpenFedLLM's choice: the anchor does not drift over the DPO rounds). Its log-probs are taken
once, before the first update.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from federation.local_training import lora_steps
from models.lora import LoraModel
from models.response_logits import response_logits, response_positions


@dataclass
class PreferenceMetrics:
    """DPO loss, reward accuracy and mean reward margin over ``pairs`` pairs."""

    loss: float
    accuracy: float
    margin: float
    pairs: int


@dataclass
class DPOResult:
    """What a client reports about its local DPO (means over its steps)."""

    loss: float
    accuracy: float
    margin: float
    tokens: int
    seconds: float


def _module(model: LoraModel | nn.Module) -> tuple[nn.Module, torch.device]:
    if isinstance(model, LoraModel):
        return model.peft, model.device
    return model, next(model.parameters()).device


def sequence_logps(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row, the summed log-probability of its response tokens (labels != -100).

    The LM head runs at response positions only and just those logits go to float32.
    """
    logits, targets = response_logits(model, batch)
    token_logps = -F.cross_entropy(logits.float(), targets, reduction="none")
    rows = response_positions(batch["labels"]).nonzero(as_tuple=True)[0]
    totals = torch.zeros(batch["labels"].shape[0], device=token_logps.device)
    return totals.index_add(0, rows, token_logps)


# trl 1.16 computes the DPO loss inline in ``DPOTrainer._compute_loss``, an instance method
# that also runs the model (through trl's fused LM head patch), the accelerator and its
# metric logging; no standalone loss function exists to call on our LoRA/compressed models.
# This is trl's "sigmoid" loss with its default reverse-KL scores, written in the same order
# of operations; tests/test_dpo.py checks it against a real DPOTrainer's loss.
def dpo_loss(
    policy_logps: torch.Tensor, reference_logps: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pair, the sigmoid DPO loss and the implicit reward margin.

    Both inputs hold 2B sequence log-probs, chosen then rejected. The margin is
    ``beta * (log pi/pi_ref (chosen) - log pi/pi_ref (rejected))``; the loss is
    ``-log sigmoid(margin)``.
    """
    chosen, rejected = policy_logps.chunk(2)
    reference_chosen, reference_rejected = reference_logps.chunk(2)
    margins = beta * ((chosen - reference_chosen) - (rejected - reference_rejected))
    return -F.logsigmoid(margins), margins


def reward_accuracy(margins: torch.Tensor) -> torch.Tensor:
    """Share of pairs ranked right; a tie counts half, so a policy equal to its reference
    scores chance (0.5), not 0 as trl's strict comparison would."""
    return (margins > 0).float().mean() + 0.5 * (margins == 0).float().mean()


@torch.no_grad()
def reference_logps(
    model: LoraModel | nn.Module, batches: Iterable[dict[str, torch.Tensor]]
) -> list[torch.Tensor]:
    """Sequence log-probs of every batch (CPU, float32), taken once from a reference model.

    Pass the result to ``preference_metrics`` with the same batches in the same order.
    """
    module, device = _module(model)
    module.eval()
    return [
        sequence_logps(module, {k: v.to(device) for k, v in batch.items()}).cpu()
        for batch in batches
    ]


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
) -> DPOResult:
    """Train only the LoRA of ``blocks`` for ``steps`` DPO steps on pair batches.

    The ``steps`` batches are drawn up front and scored by the reference: the model as
    received, or with ``reference_state`` (every LoRA parameter, by name) loaded in its
    place, after which the received LoRA is put back. Dropout stays off throughout (trl's
    ``disable_dropout`` default): the reward compares two log-probs of the same sequence,
    and dropout noise in one biases it. So with the received reference the first step's
    policy equals it exactly (loss log 2, margin 0).
    """
    blocks = tuple(blocks)
    drawn = [next(batches) for _ in range(steps)]
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
        for cpu_batch, reference in zip(drawn, references, strict=True):
            batch = {k: v.to(lora.device) for k, v in cpu_batch.items()}
            logps = sequence_logps(model, batch)
            losses, margins = dpo_loss(logps, reference.to(lora.device), beta)
            loss = losses.mean()
            update.step(loss)
            loss_total += loss.item()
            accuracy_total += reward_accuracy(margins).item()
            margin_total += margins.mean().item()
            tokens += int(batch["attention_mask"].sum())
    return DPOResult(
        loss=loss_total / max(steps, 1),
        accuracy=accuracy_total / max(steps, 1),
        margin=margin_total / max(steps, 1),
        tokens=tokens,
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def preference_metrics(
    model: LoraModel | nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    reference: Sequence[torch.Tensor],
    beta: float = 0.1,
) -> PreferenceMetrics:
    """Held-out DPO loss, reward accuracy and mean margin of ``model`` against a fixed
    reference, given as ``reference_logps(reference_model, batches)`` computed once."""
    if not batches:
        raise ValueError("no batches to evaluate")
    if len(batches) != len(reference):
        raise ValueError(f"{len(reference)} reference tensors for {len(batches)} batches")
    module, device = _module(model)
    module.eval()
    losses, margins = [], []
    for batch, ref in zip(batches, reference, strict=True):
        if ref.shape != (batch["labels"].shape[0],):
            raise ValueError("reference log-probs do not match the batches (same order?)")
        logps = sequence_logps(module, {k: v.to(device) for k, v in batch.items()})
        loss, margin = dpo_loss(logps.cpu(), ref, beta)
        losses.append(loss)
        margins.append(margin)
    loss, margin = torch.cat(losses), torch.cat(margins)
    return PreferenceMetrics(
        loss=loss.mean().item(),
        accuracy=reward_accuracy(margin).item(),
        margin=margin.mean().item(),
        pairs=margin.numel(),
    )
