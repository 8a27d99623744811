"""FedBiOT's proximal term on the adapter's effective weights.

``(eps / 2) * sum ||W_hat - W_hat_t||^2`` with ``W_hat = W0 + s * B A``. W0 is frozen and the
same on both sides, so ``W_hat - W_hat_t = s (B A - B_t A_t)``. The reference implementation
compares detached copies, so its term has no gradient; here the current A and B stay in the
graph. The squared norm is computed through r x r Gram matrices,
``||BA||^2 = <B^T B, A A^T>`` and ``<BA, B_t A_t> = <B^T B_t, A A_t^T>``, so the
d_out x d_in product is never formed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.lora import LoraModule


@dataclass
class _Anchor:
    module: LoraModule
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    anchor_sq: torch.Tensor


class EffectiveWeightProximal:
    """Snapshot the adapter at round start; ``penalty()`` is the differentiable term."""

    def __init__(self, modules: list[LoraModule], epsilon: float) -> None:
        self.epsilon = epsilon
        self.anchors = []
        for m in modules:
            a = m.lora_a.detach().clone()
            b = m.lora_b.detach().clone()
            anchor_sq = ((b.T @ b) * (a @ a.T)).sum()
            self.anchors.append(_Anchor(m, a, b, anchor_sq))

    def penalty(self) -> torch.Tensor:
        """``(eps/2) * sum_modules s^2 ||B A - B_t A_t||_F^2``."""
        total = torch.zeros(())
        for anchor in self.anchors:
            a, b = anchor.module.lora_a, anchor.module.lora_b
            current_sq = ((b.T @ b) * (a @ a.T)).sum()
            cross = ((b.T @ anchor.lora_b) * (a @ anchor.lora_a.T)).sum()
            sq = current_sq - 2 * cross + anchor.anchor_sq
            total = total + anchor.module.scaling**2 * sq
        return 0.5 * self.epsilon * total
