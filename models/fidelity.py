"""How faithfully the emulator stands in for the full model: E∘A against E*∘A.

FedBiOT's clients train the adapter A on the emulator E; the adapter is then used on the full
model E*. What A learns transfers only as far as E∘A predicts what E*∘A predicts, so the run
measures it on held-out text: the KL divergence KL(p_{E*∘A} || p_{E∘A}) per response token
and the share of response positions where both put the same token first.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from models.response_logits import response_logits


@torch.no_grad()
def agreement(
    teacher: nn.Module, student: nn.Module, batches: Iterable[dict[str, torch.Tensor]]
) -> dict[str, float]:
    """``kl`` (nats per response token) and ``top1`` (agreement of the argmax tokens)."""
    teacher.eval()
    student.eval()
    device = next(student.parameters()).device
    kl_sum, agree, count = 0.0, 0, 0
    for cpu_batch in batches:
        batch = {k: v.to(device) for k, v in cpu_batch.items()}
        full, _ = response_logits(teacher, batch)
        emulated, _ = response_logits(student, batch)
        p, q = F.log_softmax(full.float(), -1), F.log_softmax(emulated.float(), -1)
        kl_sum += float((p.exp() * (p - q)).sum())
        agree += int((full.argmax(-1) == emulated.argmax(-1)).sum())
        count += full.shape[0]
    if not count:
        return {}
    return {"kl": kl_sum / count, "top1": agree / count}
