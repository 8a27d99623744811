"""The run's preference pairs, and how a model scores on them against a reference.

Clients train DPO on the training part of ``preference-data`` and the server scores its
models on the held-out part (``server_app/preference_eval.py``), with the same split and the
same DPO arithmetic (sequence log-probs, the sigmoid loss, reward accuracy) on both sides.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from federation.run_config import RunConfig
from models.lora import LoraModel
from models.response_logits import response_logits, response_positions
from task_data import PreferencePair, load_preferences, split_preferences


def split_shared(config: RunConfig) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(training pairs, held-out pairs) of the run's preference data set."""
    key = "run-config preference-data"
    pairs = load_preferences(config.preference_data, config.data_dir or None, key)
    return split_preferences(pairs, config.test_fraction, config.seed)


@dataclass
class PreferenceMetrics:
    """DPO loss, reward accuracy and mean reward margin over ``pairs`` pairs; ``margins`` per
    pair, in the held-out order, so two models (before and after DPO) compare pairwise."""

    loss: float
    accuracy: float
    margin: float
    pairs: int
    margins: list[float]


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


def pair_scores(margins: torch.Tensor) -> torch.Tensor:
    """Per pair 1 (chosen ranked above rejected), 0 (below) or 0.5 (a tie), so that a policy
    equal to its reference scores chance (0.5), not 0 as trl's strict comparison would."""
    return (margins > 0).float() + 0.5 * (margins == 0).float()


def reward_accuracy(margins: torch.Tensor) -> torch.Tensor:
    """Share of pairs ranked right, a tie counting half (``pair_scores``)."""
    return pair_scores(margins).mean()


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
        margins=margin.tolist(),
    )
