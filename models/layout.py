"""Which original blocks form the adapter, the emulator and the dropped set.

FedBiOT (Wu et al., KDD 2024) keeps the last ``s`` blocks as the adapter and compresses the
first ``n - s`` blocks (the non-compressed emulator E*) by uniform layer drop into the
emulator E. FedOT and offsite-tuning sandwich the emulator between a bottom and a top
adapter. Methods that train LoRA on the whole model use the trivial layout: every block is
adapter, nothing is emulated or dropped. The layout is pure arithmetic, so it is computed and
validated before any model is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class Layout:
    """Original block indices of each part of a compressed model."""

    num_blocks: int
    adapter_blocks: tuple[int, ...]
    emulator_blocks: tuple[int, ...]

    @property
    def kept_blocks(self) -> tuple[int, ...]:
        """Blocks of the compressed model, in forward order."""
        return tuple(sorted(self.adapter_blocks + self.emulator_blocks))

    @property
    def dropped_blocks(self) -> tuple[int, ...]:
        """Blocks that never leave the server."""
        kept = set(self.kept_blocks)
        return tuple(i for i in range(self.num_blocks) if i not in kept)

    @property
    def distill_tap(self) -> int:
        """The adapter block whose input is the emulator's output (compared in distillation)."""
        top = max(self.emulator_blocks)
        return min(b for b in self.adapter_blocks if b > top)

    @property
    def full_emulator_blocks(self) -> tuple[int, ...]:
        """Blocks of the non-compressed emulator E* (everything but the adapter)."""
        adapter = set(self.adapter_blocks)
        return tuple(i for i in range(self.num_blocks) if i not in adapter)

    def to_dict(self) -> dict[str, list[int] | int]:
        """JSON-friendly form, recorded in each run's config.json."""
        return {
            "num_blocks": self.num_blocks,
            "adapter_blocks": list(self.adapter_blocks),
            "emulator_blocks": list(self.emulator_blocks),
            "dropped_blocks": list(self.dropped_blocks),
        }


def uniform_keep(num: int, keep: int) -> tuple[int, ...]:
    """Indices ``floor(j * (num - 1) / (keep - 1))``: first and last are always kept."""
    if keep == 1:
        return (0,)
    return tuple((j * (num - 1)) // (keep - 1) for j in range(keep))


def emulator_size(num: int, drop_rate: float) -> int:
    """``floor((1 - beta) * num)``, exact for decimal drop rates such as 0.1 or 0.7.

    Plain float arithmetic gives ``(1 - 0.9) * 10 = 0.999...``, which would floor to 0.
    """
    kept = (1 - Fraction(str(drop_rate))) * num
    return math.floor(kept)


def fedbiot_layout(num_blocks: int, adapter_layers: int, drop_rate: float) -> Layout:
    """Adapter = the last ``s`` blocks; emulator = uniform ``1 - beta`` of the rest."""
    if num_blocks < 2:
        raise ValueError(f"the model has {num_blocks} block(s); FedBiOT needs at least 2")
    if not 1 <= adapter_layers <= num_blocks - 1:
        raise ValueError(
            f"adapter-layers={adapter_layers} must be between 1 and {num_blocks - 1} "
            f"(the model has {num_blocks} blocks and the emulator needs at least one)"
        )
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop-rate={drop_rate} must be in [0, 1)")
    rest = num_blocks - adapter_layers
    keep = emulator_size(rest, drop_rate)
    if keep < 1:
        raise ValueError(
            f"drop-rate={drop_rate} keeps no emulator block of the {rest} below the "
            "adapter; lower it"
        )
    return Layout(
        num_blocks=num_blocks,
        adapter_blocks=tuple(range(rest, num_blocks)),
        emulator_blocks=uniform_keep(rest, keep),
    )


def fedot_layout(num_blocks: int, drop_rate: float, bottom: int = 2, top: int = 2) -> Layout:
    """FedOT / offsite-tuning: adapter = the first ``bottom`` and the last ``top`` blocks;
    emulator = uniform ``1 - beta`` of the middle blocks."""
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop-rate={drop_rate} must be in [0, 1)")
    middle = num_blocks - bottom - top
    if middle < 1:
        raise ValueError(
            f"the model has {num_blocks} blocks; FedOT needs more than {bottom + top} "
            f"({bottom} bottom and {top} top adapter blocks and at least one emulator block)"
        )
    keep = emulator_size(middle, drop_rate)
    if keep < 1:
        raise ValueError(f"drop-rate={drop_rate} keeps none of the {middle} middle blocks")
    return Layout(
        num_blocks=num_blocks,
        adapter_blocks=tuple(range(bottom)) + tuple(range(num_blocks - top, num_blocks)),
        emulator_blocks=tuple(bottom + i for i in uniform_keep(middle, keep)),
    )


def full_layout(num_blocks: int) -> Layout:
    """LoRA on the whole model (FedIT, local, central): every block is adapter."""
    if num_blocks < 1:
        raise ValueError("the model has no blocks")
    return Layout(
        num_blocks=num_blocks, adapter_blocks=tuple(range(num_blocks)), emulator_blocks=()
    )
