"""The compute dtype of the frozen weights, and gradient checkpointing.

Frozen weights are stored (and multiplied) in the run's ``dtype``; LoRA parameters stay
float32, so AdamW's state and the updates that travel are full precision: peft's
``get_peft_model`` casts adapter weights of a half-precision base to float32, and its LoRA
layers cast their input to the adapter's dtype and their output back to the base's. Every
loss upcasts logits and hidden states to float32 before reducing them. ``auto`` is bfloat16
on a CUDA card that supports it (Ampere and newer) and float32 elsewhere: bfloat16 on a CPU
saves memory but is slower than float32 there, and float16's narrow range needs a loss
scaler this code does not run, so it is only for a card without bfloat16 where memory is
what limits.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from models.formats import DTYPES


def check_dtype(name: str, where: str = "dtype") -> str:
    """``name`` if it is one of ``DTYPES``, else an error naming the config key."""
    if name not in DTYPES:
        raise ValueError(f"{where}={name!r}: expected one of {', '.join(DTYPES)}")
    return name


def resolve_dtype(name: str, device: torch.device, where: str = "dtype") -> torch.dtype:
    """The torch dtype of ``name`` for a model on ``device`` (``auto`` resolved there)."""
    check_dtype(name, where)
    if name == "auto":
        cuda = device.type == "cuda" and torch.cuda.is_available()
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def set_gradient_checkpointing(model: PreTrainedModel, on: bool) -> None:
    """Recompute each block's activations in backward instead of storing them (training
    mode only). Non-reentrant checkpointing, without transformers' hook that makes the
    embeddings' output require grad: blocks whose inputs and weights need no gradient (the
    frozen emulator below the adapter) then store nothing and are not recomputed, so only
    the trainable region pays for the recomputation."""
    if on and not model.is_activation_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
        model.disable_input_require_grads()
    elif not on and model.is_activation_checkpointing:
        model.activation_checkpointing_disable()
