"""Tensors to and from Flower ArrayRecords.

Every dtype NumPy has travels as a NumPy array (Flower's ``numpy.ndarray`` stype). NumPy has
no bfloat16, so a bf16 tensor travels as its raw 2-byte little-endian words under our own
stype ``BF16_STYPE``: the frozen weights of a bf16 run go at half the size of float32, and
the digest both sides compute (``state_digest``) is of the bf16 tensors themselves. Arrays
come from other parties (the server's package to nodes, nodes' replies), so ``from_record``
checks each raw array's shape and byte count before it decodes anything.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

BF16_STYPE = "torch.bfloat16.raw"


def _bf16_array(tensor: torch.Tensor) -> Array:
    words = np.ascontiguousarray(tensor.contiguous().view(torch.int16).numpy(), dtype="<i2")
    return Array(
        dtype="bfloat16", shape=tuple(tensor.shape), stype=BF16_STYPE, data=words.tobytes()
    )


def to_record(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """An ArrayRecord of the tensors: bf16 as raw words, every other dtype as NumPy."""
    arrays = {}
    for name, tensor in state.items():
        t = tensor.detach().cpu()
        if t.dtype == torch.bfloat16:
            arrays[name] = _bf16_array(t)
        else:
            arrays[name] = Array(np.ascontiguousarray(t.numpy()))
    return ArrayRecord(arrays)


def _bf16_tensor(name: str, array: Array) -> torch.Tensor:
    shape = array.shape
    if not isinstance(shape, tuple | list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise ValueError(f"array {name!r}: shape {str(shape)[:80]} is not non-negative integers")
    if array.dtype != "bfloat16":
        raise ValueError(f"array {name!r}: stype {BF16_STYPE!r} with dtype {array.dtype!r}")
    expected = 2 * math.prod(shape)
    if len(array.data) != expected:
        raise ValueError(
            f"array {name!r}: {len(array.data)} bytes for bfloat16{list(shape)}, "
            f"expected {expected}"
        )
    words = np.frombuffer(array.data, dtype="<i2").astype(np.int16)  # a native, writable copy
    return torch.from_numpy(words).view(torch.bfloat16).reshape(tuple(shape))


def array_tensor(name: str, array: Array) -> torch.Tensor:
    """The tensor one Array holds (NumPy or raw bf16); ValueError naming it otherwise."""
    if array.stype == BF16_STYPE:
        return _bf16_tensor(name, array)
    if array.stype != SType.NUMPY:
        raise ValueError(f"array {name!r}: unknown stype {str(array.stype)[:80]!r}")
    return torch.from_numpy(np.array(array.numpy()))


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Tensors of an ArrayRecord, checked to be finite."""
    out = {}
    for name, array in record.items():
        value = array_tensor(name, array)
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
