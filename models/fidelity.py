"""How faithfully the emulator stands in for the full model: E∘A against E*∘A.

FedBiOT's clients train the adapter A on the emulator E; the adapter is then used on the full
model E*. What A learns transfers only as far as E∘A predicts what E*∘A predicts, so the run
measures it on held-out text: the KL divergence KL(p_{E*∘A} || p_{E∘A}) per response token
and the share of response positions where both put the same token first. Both are kept per
text as well, so a caller can put an interval on them that resamples texts (the tokens of
one text are not independent draws).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from models.response_logits import response_logits, response_positions


@torch.no_grad()
def per_text_agreement(
    teacher: nn.Module, student: nn.Module, batches: Iterable[dict[str, torch.Tensor]]
) -> dict[str, list[float]]:
    """Per text with a response: ``kl`` (summed over its response tokens), ``agree`` (its
    positions whose argmax tokens match) and ``tokens`` (its response tokens)."""
    teacher.eval()
    student.eval()
    device = next(student.parameters()).device
    texts: dict[str, list[float]] = {"kl": [], "agree": [], "tokens": []}
    for cpu_batch in batches:
        batch = {k: v.to(device) for k, v in cpu_batch.items()}
        full, _ = response_logits(teacher, batch)
        emulated, _ = response_logits(student, batch)
        p, q = F.log_softmax(full.float(), -1), F.log_softmax(emulated.float(), -1)
        kl = (p.exp() * (p - q)).sum(-1)
        agree = (full.argmax(-1) == emulated.argmax(-1)).float()
        # response_logits flattens the kept positions row by row: split them back per text.
        counts = [int(n) for n in response_positions(batch["labels"]).sum(1) if n]
        for part, name in ((kl, "kl"), (agree, "agree")):
            texts[name] += [float(x.sum()) for x in torch.split(part, counts)]
        texts["tokens"] += [float(n) for n in counts]
    return texts
