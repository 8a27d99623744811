"""Adapter depth from a client's memory budget and the *measured* memory of each depth.

A client of depth ``s`` trains the LoRA of the last ``s`` adapter blocks. What that costs in
memory (frozen weights, activations kept for backward through ``s`` blocks, LoRA gradients,
AdamW moments) is measured by running one real client training step per depth, not
estimated from parameter counts. Budgets come from each SuperNode's node config
(``memory-budget-gb``) or, in simulation, from a run-config map of partitions to budgets.
GB here is 10^9 bytes.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from client_app.local_training import train_lora
from models.lora import LoraModel

GB = 1e9
BUDGET_KEY = "memory-budget-gb"


class MemoryBudgetError(ValueError):
    """A client's memory budget is missing, malformed or too small for any depth."""


def parse_depth_table(
    text: str, adapter_layers: int, num_blocks: int | None = None
) -> tuple[int, ...]:
    """Depths like ``"2,4,6"``: positive, increasing, the deepest within the adapter region.

    The adapter region is the last ``adapter_layers`` blocks; ``num_blocks`` (known once the
    model is loaded) bounds the region itself.
    """
    try:
        depths = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"depth-table={text!r} must be comma-separated integers") from None
    if any(d < 1 for d in depths):
        raise ValueError(f"depth-table={text!r}: depths must be >= 1")
    if any(a >= b for a, b in itertools.pairwise(depths)):
        raise ValueError(f"depth-table={text!r}: depths must be strictly increasing")
    if depths[-1] > adapter_layers:
        raise ValueError(
            f"depth-table={text!r}: depth {depths[-1]} exceeds the adapter region "
            f"(adapter-layers={adapter_layers})"
        )
    if num_blocks is not None and adapter_layers > num_blocks:
        raise ValueError(f"adapter-layers={adapter_layers} exceeds the model's {num_blocks} blocks")
    return depths


def _budget(value: Any, where: str) -> float:
    """A positive, finite number of GB, or an error naming where it came from."""
    try:
        budget = float(value)
    except (TypeError, ValueError):
        raise MemoryBudgetError(f"{where}: {value!r} is not a number of GB") from None
    if not math.isfinite(budget) or budget <= 0:
        raise MemoryBudgetError(f"{where}: {value!r} must be a positive number of GB")
    return budget


def parse_budget_map(text: str, key: str = "memory-budgets") -> dict[int, float]:
    """Partition budgets like ``"0:2.0,1:4.0,2:8.0"`` (run-config ``key``; empty: none)."""
    budgets: dict[int, float] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        partition, sep, value = entry.partition(":")
        if not sep or not partition.strip().isdigit():
            raise MemoryBudgetError(
                f"run-config {key}: entry {entry!r} must be <partition>:<GB>, e.g. 0:4.0"
            )
        pid = int(partition)
        if pid in budgets:
            raise MemoryBudgetError(f"run-config {key}: partition {pid} is given twice")
        budgets[pid] = _budget(value.strip(), f"run-config {key} entry {entry!r}")
    return budgets


def node_budget_gb(node_config: Mapping[str, Any], budgets: Mapping[int, float]) -> float:
    """The node's own ``memory-budget-gb``, else its partition's entry in the run config."""
    if BUDGET_KEY in node_config:
        return _budget(node_config[BUDGET_KEY], f"node config {BUDGET_KEY}")
    partition = node_config.get("partition-id")
    if partition is not None and int(partition) in budgets:
        return budgets[int(partition)]
    hint = f" or run-config memory-budgets an entry for partition {partition}"
    raise MemoryBudgetError(
        f"the node declares no memory budget: give node config {BUDGET_KEY}"
        + (hint if partition is not None else "")
    )


def choose_depths(
    budgets_gb: Mapping[int, float], measured_gb: Mapping[int, float]
) -> dict[int, int]:
    """Each client's deepest depth whose measured memory fits its budget.

    A client below the shallowest depth is an error rather than a silent skip: it asked to
    take part, and the run should not quietly train without it.
    """
    if not measured_gb:
        raise ValueError("no measured memory for any adapter depth")
    shallowest = min(measured_gb)
    depths = {}
    for client, budget in budgets_gb.items():
        fitting = [d for d, need in measured_gb.items() if need <= budget]
        if not fitting:
            raise MemoryBudgetError(
                f"client {client}: memory budget {budget:g} GB is below the "
                f"{measured_gb[shallowest]:.3g} GB measured for the shallowest adapter depth "
                f"{shallowest}"
            )
        depths[client] = max(fitting)
    return depths


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
    The server runs this once per run on its own compressed model, so the numbers are for
    the server's device type (CUDA allocator statistics, or live tensor storages on the CPU);
    they are not rescaled for other hardware, and exclude per-process overheads such as the
    CUDA context. The LoRA values and the random state are restored afterwards.
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
