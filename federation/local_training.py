"""The client step: K AdamW steps on the trained LoRA, with the method's proximal terms.

A step may accumulate ``accum_steps`` micro-batches before its update; each micro-batch's
loss is its summed token losses over the step's total token count, so the accumulated
gradient is the gradient of the whole step's batch (a per-micro-batch mean would weight a
short micro-batch's tokens more).

FedBiOT's proximal term acts on the adapter's effective weights, FedProx's on the LoRA
parameters; SCAFFOLD moves the weights by ``-lr * (c - c_i)`` after every AdamW step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from federation.proximal import EffectiveWeightProximal
from models.lora import LoraModel
from models.response_logits import IGNORE_INDEX, response_logits


@dataclass
class TrainResult:
    """What a client reports about its local training."""

    loss: float
    prox: float
    tokens: int
    seconds: float


class LoraSteps:
    """AdamW on the LoRA of the given blocks alone, with gradient clipping: the update every
    client objective (SFT, DPO) shares."""

    def __init__(
        self,
        lora: LoraModel,
        blocks: tuple[int, ...],
        learning_rate: float,
        weight_decay: float,
        max_grad_norm: float,
    ) -> None:
        self.params = lora.train_only(blocks)
        self.optimizer = torch.optim.AdamW(self.params, lr=learning_rate, weight_decay=weight_decay)
        self.max_grad_norm = max_grad_norm

    def step(self, loss: torch.Tensor, after: Callable[[], None] | None = None) -> None:
        """Backward (onto gradients ``accumulate`` left), clip, update, then ``after``
        (SCAFFOLD's correction step)."""
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if after is not None:
            with torch.no_grad():
                after()

    @staticmethod
    def accumulate(loss: torch.Tensor) -> None:
        """Backward a micro-batch's share of the step's loss; ``step`` updates later."""
        loss.backward()


@contextmanager
def lora_steps(
    lora: LoraModel,
    blocks: tuple[int, ...],
    learning_rate: float,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
) -> Iterator[LoraSteps]:
    """``LoraSteps`` for a local training call; every LoRA parameter is frozen again after,
    so nothing outside the call accumulates gradients."""
    steps = LoraSteps(lora, blocks, learning_rate, weight_decay, max_grad_norm)
    try:
        yield steps
    finally:
        for p in steps.params:
            p.requires_grad_(False)


def lora_proximal(
    params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], mu: float
) -> torch.Tensor:
    """FedProx's ``(mu/2) * ||w - w_t||^2`` over the trained LoRA parameters."""
    total = sum(((p - anchor[name]) ** 2).sum() for name, p in params.items())
    return 0.5 * mu * total


def client_control_update(
    c: Mapping[str, torch.Tensor],
    c_i: Mapping[str, torch.Tensor],
    x: Mapping[str, torch.Tensor],
    y: Mapping[str, torch.Tensor],
    steps: int,
    learning_rate: float,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """SCAFFOLD option II after ``steps`` steps from ``x`` to ``y`` (strategies/scaffold.py
    has the server's half): returns ``(c_i+, delta_c_i)``."""
    new, delta = {}, {}
    for name in c:
        new[name] = c_i[name] - c[name] + (x[name] - y[name]) / (steps * learning_rate)
        delta[name] = new[name] - c_i[name]
    return new, delta


def train_lora(
    lora: LoraModel,
    blocks: Iterable[int],
    batches: Iterator[dict[str, torch.Tensor]],
    steps: int,
    learning_rate: float,
    prox_epsilon: float = 0.0,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    proximal_mu: float = 0.0,
    correction: dict[str, torch.Tensor] | None = None,
    accum_steps: int = 1,
) -> TrainResult:
    """Train only the LoRA of ``blocks`` for ``steps`` steps on response-token LM loss,
    each step on ``accum_steps`` batches (the mean over all their response tokens).

    With ``prox_epsilon > 0`` the loss adds FedBiOT's ``(eps/2)||W_hat - W_hat_t||^2`` over
    those blocks' effective weights; with ``proximal_mu > 0``, FedProx's
    ``(mu/2)||w - w_t||^2`` over their LoRA parameters; both anchored at the values when this
    call starts. ``correction`` (SCAFFOLD's ``c - c_i``, by parameter name) is applied as its
    own step after every AdamW step, ``w <- w - learning_rate * (c - c_i)`` (OpenFedLLM's
    SCAFFOLD): added to the gradient instead, Adam would rescale it per coordinate like the
    gradient, while option II's ``(x - y) / (K lr)`` measures displacement per unit of
    learning rate. Applied this way, ``c_i+`` is exactly the client's mean AdamW step per
    unit of learning rate, and ``c - c_i`` corrects in those units.
    """
    blocks = tuple(blocks)
    named = lora.params(blocks)
    anchor = {k: p.detach().clone() for k, p in named.items()} if proximal_mu > 0 else {}
    unknown = sorted(set(correction or {}) - set(named))
    if unknown:
        raise ValueError(f"SCAFFOLD correction for parameters not trained here: {unknown[:3]}")
    shift = {k: v.to(named[k].device, named[k].dtype) for k, v in (correction or {}).items()}

    def correct() -> None:
        for name, delta in shift.items():
            named[name].sub_(learning_rate * delta)

    prox = EffectiveWeightProximal(lora.modules_of(blocks), prox_epsilon)
    model = lora.peft
    model.train()
    trained = set(blocks)
    for module in lora.modules.values():
        if module.block not in trained:
            module.layer.eval()  # frozen LoRA (e.g. the emulator's) gets no dropout
    lm_total, prox_total, tokens = 0.0, 0.0, 0
    start = time.perf_counter()
    with lora_steps(lora, blocks, learning_rate, weight_decay, max_grad_norm) as update:
        for _ in range(steps):
            micro = [next(batches) for _ in range(accum_steps)]
            count = max(sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro), 1)
            for i, cpu_batch in enumerate(micro):
                batch = {k: v.to(lora.device) for k, v in cpu_batch.items()}
                logits, targets = response_logits(model, batch)
                share = F.cross_entropy(logits.float(), targets, reduction="sum") / count
                lm_total += share.item()
                tokens += int(cpu_batch["attention_mask"].sum())
                if i < accum_steps - 1:
                    update.accumulate(share)
            penalty = prox.penalty() if prox_epsilon > 0 else torch.zeros((), device=lora.device)
            if proximal_mu > 0:
                penalty = penalty + lora_proximal(named, anchor, proximal_mu)
            update.step(share + penalty, correct if shift else None)
            prox_total += penalty.item()
    model.eval()
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
