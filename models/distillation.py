"""Emulator distillation: pull E∘A towards E*∘A on public data, training emulator LoRA only.

loss = ||E(x) - E*(x)||^2 / ||E*(x)||^2  +  lambda * KL(p_{E*∘A} || p_{E∘A})

The first term compares the emulator's and the full emulator's output hidden states (the
input of the first adapter block) over every non-padding token, prompt included. The paper's
Eq. 3 takes it on the response part; here it covers the prompt too because the adapter's
attention reads the emulator's output at every position, so an emulator that is faithful
only on response positions still feeds the adapter a distorted context. It is divided by the
teacher's squared norm on the same batch, which makes it a relative error: LLM hidden states
carry a few huge activations (SmolLM2's mean squared value is in the thousands), and the raw
L2 term would otherwise drown the KL term whatever lambda is. That norm changes from batch to
batch, so the division also reweights batches against each other: it is not a constant, and
the minimiser over many batches is not the raw L2 term's. ``hidden_norm="raw"`` takes the
paper's raw term instead (squared error summed over the hidden size, averaged over tokens),
so that a sweep can measure what the normalisation is worth.
The KL term is taken on the response tokens only, as the paper defines it (the reference
code takes it over every token), and averaged over those tokens.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.blocks import get_blocks
from models.fedbiot_models import FedBiOTModels
from models.progress import progress
from models.response_logits import response_logits


class _Capture:
    """Forward pre-hook that records a block's input hidden states."""

    def __init__(self, block: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self.handle = block.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.value = args[0] if args else kwargs["hidden_states"]


@dataclass
class DistillLosses:
    total: torch.Tensor
    hidden: torch.Tensor
    kl: torch.Tensor


def kl_per_token(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) averaged over the rows of two (N, vocab) logit matrices."""
    if teacher_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    teacher = F.log_softmax(teacher_logits.float(), dim=-1)
    student = F.log_softmax(student_logits.float(), dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean")


class EmulatorDistiller:
    """Distils the emulator's LoRA; keeps its AdamW state across rounds."""

    def __init__(
        self,
        models: FedBiOTModels,
        batches: Iterator[dict[str, torch.Tensor]],
        learning_rate: float,
        kd_lambda: float,
        hidden_norm: str = "relative",
    ) -> None:
        if hidden_norm not in ("relative", "raw"):
            raise ValueError(f"hidden_norm={hidden_norm!r}: 'relative' or 'raw'")
        self.models = models
        self.batches = batches
        self.kd_lambda = kd_lambda
        self.hidden_norm = hidden_norm
        emulator = models.layout.emulator_blocks
        self.params = list(models.compressed.params(emulator).values())
        self.optimizer = torch.optim.AdamW(self.params, lr=learning_rate, weight_decay=0.0)
        self.batches_used = 0  # a checkpoint records it; a resumed run skips as many
        if not emulator:
            raise ValueError("this layout has no emulator to distil")
        # Compare the inputs of the first adapter block above the emulator: its position in
        # the compressed model differs from its (original) position in the full model.
        tap = models.layout.distill_tap
        student_position = models.layout.kept_blocks.index(tap)
        self._student_tap = get_blocks(models.compressed.peft.get_base_model())[student_position]
        self._teacher_tap = get_blocks(models.full.peft.get_base_model())[tap]

    def losses(self, batch: dict[str, torch.Tensor]) -> DistillLosses:
        """Both loss terms on one batch (student graph kept for backward)."""
        batch = {k: v.to(self.models.compressed.device) for k, v in batch.items()}
        teacher_cap = _Capture(self._teacher_tap)
        student_cap = _Capture(self._student_tap)
        try:
            with torch.no_grad():
                teacher_logits, _ = response_logits(self.models.full.peft, batch)
            student_logits, _ = response_logits(self.models.compressed.peft, batch)
        finally:
            teacher_cap.handle.remove()
            student_cap.handle.remove()
        assert teacher_cap.value is not None and student_cap.value is not None
        # In float32: a bfloat16 sum over every token's hidden state loses the small error.
        student, teacher = student_cap.value.float(), teacher_cap.value.float()
        mask = batch["attention_mask"].unsqueeze(-1).float()
        sq = ((student - teacher) ** 2 * mask).sum()
        if self.hidden_norm == "relative":
            scale = (teacher**2 * mask).sum().clamp(min=1e-12)
        else:
            scale = mask.sum().clamp(min=1.0)
        hidden = sq / scale
        kl = kl_per_token(teacher_logits, student_logits)
        return DistillLosses(total=hidden + self.kd_lambda * kl, hidden=hidden, kl=kl)

    def skip_batches(self, count: int) -> None:
        """Advance the public-data stream to where a checkpointed run left it."""
        for _ in range(count - self.batches_used):
            next(self.batches)
        self.batches_used = max(count, self.batches_used)

    def run(self, steps: int) -> dict[str, float]:
        """``steps`` AdamW steps on emulator LoRA; mean losses (empty dict for 0 steps)."""
        if steps <= 0:
            return {}
        self.models.compressed.train_only(self.models.layout.emulator_blocks)
        self.models.compressed.peft.train()
        emulator = set(self.models.layout.emulator_blocks)
        for module in self.models.compressed.modules.values():
            if module.block not in emulator:
                module.layer.eval()  # the frozen adapter LoRA gets no dropout
        self.models.full.peft.eval()
        sums = {"distill_loss": 0.0, "distill_hidden": 0.0, "distill_kl": 0.0}
        for _ in progress(range(steps), "distillation"):
            parts = self.losses(next(self.batches))
            self.batches_used += 1
            parts.total.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            sums["distill_loss"] += parts.total.item()
            sums["distill_hidden"] += parts.hidden.item()
            sums["distill_kl"] += parts.kl.item()
        self.models.compressed.peft.eval()
        for p in self.params:
            p.requires_grad_(False)
        return {k: v / steps for k, v in sums.items()}
