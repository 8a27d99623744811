"""Tensors to and from Flower ArrayRecords.

NumPy has no bfloat16, so bf16 tensors travel as float32 and are cast back to the receiving
parameter's dtype on load (``LoraModel.load_state`` does that).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord


def to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """An ArrayRecord of the tensors, bf16 widened to float32."""
    arrays = {}
    for name, tensor in state.items():
        t = tensor.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        arrays[name] = Array(np.ascontiguousarray(t.numpy()))
    return ArrayRecord(arrays)


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Tensors of an ArrayRecord, checked to be finite."""
    out = {}
    for name, array in record.items():
        value = torch.from_numpy(np.array(array.numpy()))
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ValueError(f"array {name!r} holds NaN or Inf")
        out[name] = value
    return out


def record_bytes(record: ArrayRecord | None) -> int:
    """Bytes an ArrayRecord puts on the wire (Flower's own count: data plus keys)."""
    return 0 if record is None else record.count_bytes()


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    """Raw tensor bytes, for a quick estimate without serialising."""
    return sum(math.prod(t.shape) * t.element_size() for t in state.values())


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """Full SHA-256 of named tensors (name, dtype, shape, bytes), in name order.

    The server names the frozen weights by it and a node checks its stored copy against it,
    so both sides hash tensors, not one serialisation (ArrayRecord bytes vs safetensors).
    """
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()
