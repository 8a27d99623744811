"""The FedBiOT client step: K AdamW steps on the adapter LoRA, with the proximal term."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from client_app.proximal import EffectiveWeightProximal
from models.lora import LoraModel
from models.response_logits import response_lm_loss, response_logits


@dataclass
class TrainResult:
    """What a client reports about its local training."""

    loss: float
    prox: float
    tokens: int
    seconds: float


def train_lora(
    lora: LoraModel,
    blocks: Iterable[int],
    batches: Iterator[dict[str, torch.Tensor]],
    steps: int,
    learning_rate: float,
    prox_epsilon: float = 0.0,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
) -> TrainResult:
    """Train only the LoRA of ``blocks`` for ``steps`` steps on response-token LM loss.

    With ``prox_epsilon > 0`` the loss adds ``(eps/2)||W_hat - W_hat_t||^2`` over those
    blocks' effective weights, anchored at their values when this call starts.
    """
    blocks = tuple(blocks)
    params = lora.train_only(blocks)
    prox = EffectiveWeightProximal(lora.modules_of(blocks), prox_epsilon)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    model = lora.peft
    model.train()
    lm_total, prox_total, tokens = 0.0, 0.0, 0
    start = time.perf_counter()
    for _ in range(steps):
        batch = {k: v.to(lora.device) for k, v in next(batches).items()}
        lm_loss = response_lm_loss(model, batch)
        penalty = prox.penalty() if prox_epsilon > 0 else torch.zeros(())
        (lm_loss + penalty).backward()
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lm_total += lm_loss.item()
        prox_total += penalty.item()
        tokens += int(batch["attention_mask"].sum())
    model.eval()
    for p in params:
        p.requires_grad_(False)
    return TrainResult(
        loss=lm_total / max(steps, 1),
        prox=prox_total / max(steps, 1),
        tokens=tokens,
        seconds=time.perf_counter() - start,
    )


@torch.no_grad()
def response_loss(lora: LoraModel, batches: Iterable[dict[str, torch.Tensor]]) -> float:
    """Mean LM loss per response token over the batches (a held-out measure)."""
    model = lora.peft
    model.eval()
    total, count = 0.0, 0
    for cpu_batch in batches:
        batch = {k: v.to(lora.device) for k, v in cpu_batch.items()}
        logits, targets = response_logits(model, batch)
        total += F.cross_entropy(logits.float(), targets, reduction="sum").item()
        count += targets.numel()
    return total / max(count, 1)
