"""Training FLOPs per token of a client step, counted by PyTorch on the real computation.

``torch.utils.flop_counter.FlopCounterMode`` counts the FLOPs of every matrix product in one
forward and backward pass of the client's loss (response-token LM loss, LoRA trained on the
given blocks only). Backward stops at the lowest trainable block, which is why an adapter on
top (FedBiOT) costs far less than an adapter at the bottom (FedOT) or LoRA everywhere. It
also works on the ``meta`` device, so a 7B model's count needs no weights.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.utils.flop_counter import FlopCounterMode

from models.lora import LoraModel
from models.response_logits import response_lm_loss


def training_flops_per_token(
    lora: LoraModel,
    blocks: Iterable[int],
    batch: dict[str, torch.Tensor],
    response_only: bool = True,
) -> float:
    """FLOPs (2 per multiply-add) of one forward + backward, per input token of ``batch``.

    ``response_only=False`` takes the LM head on every position, as most implementations do
    (and as meta tensors need: selecting response positions reads their values).
    """
    lora.train_only(blocks)
    with FlopCounterMode(display=False) as counter:
        loss = response_lm_loss(lora.peft, batch) if response_only else lora.peft(**batch).loss
        loss.backward()
    lora.peft.zero_grad(set_to_none=True)
    for p in lora.peft.parameters():
        p.requires_grad_(False)
    return counter.get_total_flops() / batch["input_ids"].numel()
