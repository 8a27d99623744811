"""The memory of one real client training step, per adapter depth (FedBiAlign).

What a depth costs (frozen weights, activations kept for backward through ``s`` blocks, LoRA
gradients, AdamW moments) is measured by running the client's own ``train_lora`` step, not
estimated; ``bench/memory_plan.py --check`` and the tests compare it with the estimate the
FedBiAlign server's depth table uses (``models/memory_estimate.py``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from federation.local_training import train_lora
from models.depth_memory import GB
from models.lora import LoraModel


class _LiveStorageBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created inside the mode and still alive.

    The CPU has no allocator statistics like CUDA's, and process RSS counts allocator caches
    and everything else in the process. Every aten op passes through a dispatch mode, so each
    new storage (an output whose storage is none of the op's inputs': not a view, not
    in-place) is counted when created and uncounted by a weak-reference callback when freed.
    This is our own tracker rather than ``torch.distributed._tools.mem_tracker``, a private
    module whose API changes between releases. Scratch memory inside a single kernel is not
    visible at this level.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: dict[int, weakref.ref] = {}

    def _forget(self, key: int, nbytes: int) -> None:
        self._tracked.pop(key, None)
        self.live -= nbytes

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = {
            id(t.untyped_storage())
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = id(storage)
            if key in inputs or key in self._tracked:
                continue
            nbytes = storage.nbytes()
            self._tracked[key] = weakref.ref(storage, lambda _, k=key, n=nbytes: self._forget(k, n))
            self.live += nbytes
        self.peak = max(self.peak, self.live)
        return out


def _peak_extra_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes ``step`` allocates above what is already allocated when it starts."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    tracker = _LiveStorageBytes()
    with tracker:
        step()
    return tracker.peak


def module_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers, shared (tied) storages counted once."""
    storages = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        storage = tensor.untyped_storage()
        storages[id(storage)] = storage.nbytes()
    return sum(storages.values())


def measure_training_memory(
    lora: LoraModel,
    adapter_blocks: Sequence[int],
    depths: Iterable[int],
    batch_size: int,
    seq_length: int,
    prox_epsilon: float = 0.0,
) -> dict[int, float]:
    """GB a client needs for one training step at each depth, measured, not estimated.

    Runs the client's own step (``train_lora``: forward, backward, gradient clipping and an
    AdamW step) on ``lora`` once per depth, training the LoRA of the last ``depth`` of
    ``adapter_blocks``, on a ``batch_size x seq_length`` batch whose every token carries loss
    (the worst case of the response-only loss). The result is the model's weights plus the
    step's peak allocation on top of them, so other models on the same device do not count.
    The numbers are for the measuring device type (CUDA allocator statistics, or live tensor
    storages on the CPU); they are not rescaled for other hardware, and exclude per-process
    overheads such as the CUDA context. The LoRA values and the random state are restored
    afterwards.
    """
    device = lora.device
    region = tuple(adapter_blocks)
    vocab = lora.peft.get_base_model().config.vocab_size
    weights = module_bytes(lora.peft)
    snapshot = lora.state(region)
    measured = {}
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            for depth in depths:
                if not 1 <= depth <= len(region):
                    raise ValueError(f"depth {depth} is outside 1..{len(region)}")
                blocks = region[-depth:]

                def step(blocks: tuple[int, ...] = blocks) -> None:
                    ids = torch.randint(vocab, (batch_size, seq_length), device=device)
                    batch = {
                        "input_ids": ids,
                        "attention_mask": torch.ones_like(ids),
                        "labels": ids,
                    }
                    train_lora(
                        lora,
                        blocks,
                        iter([batch]),
                        steps=1,
                        learning_rate=1e-4,
                        prox_epsilon=prox_epsilon,
                    )

                measured[depth] = (weights + _peak_extra_bytes(step, device)) / GB
    finally:
        lora.load_state(snapshot)
    return measured
