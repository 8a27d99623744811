"""4-bit and 8-bit (bitsandbytes) loading of a client's frozen weights, for GPU nodes.

Only the frozen base is quantized; LoRA stays in full precision (QLoRA). bitsandbytes'
kernels need CUDA, so a node that asks for quantization without a CUDA device (or without
the ``bitsandbytes`` package) logs why and loads its weights in its compute dtype instead:
the federation goes on, that node just uses more memory.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from logging import WARNING
from typing import Any

import torch
from flwr.common.logger import log

from models.formats import QUANTIZATION_MODES


@dataclass(frozen=True)
class LoadPlan:
    """How to load the frozen weights: ``from_pretrained`` arguments and the mode used."""

    mode: str
    kwargs: dict[str, Any]
    note: str = ""


def check_mode(mode: str, where: str = "quantization") -> str:
    """The mode, or a clear error naming the config key."""
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"{where}={mode!r}: expected one of {', '.join(QUANTIZATION_MODES)}")
    return mode


def _missing_requirement() -> str:
    if not torch.cuda.is_available():
        return "this node has no CUDA device"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "the bitsandbytes package is not installed (pip install bitsandbytes)"
    return ""


def load_plan(mode: str, dtype: torch.dtype = torch.float32) -> LoadPlan:
    """``from_pretrained`` arguments for ``mode``, falling back to unquantized ``dtype``
    weights where the node cannot quantize (the fallback is logged and reported in the
    plan's ``note``). Quantized layers compute in ``dtype`` if it is a half type, else in
    bfloat16."""
    check_mode(mode)
    if mode == "none":
        return LoadPlan("none", {"dtype": dtype})
    missing = _missing_requirement()
    if missing:
        name = str(dtype).removeprefix("torch.")
        note = f"quantization={mode} needs CUDA and bitsandbytes: {missing}; loading {name}"
        log(WARNING, note)
        return LoadPlan("none", {"dtype": dtype}, note)
    compute = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    from transformers import BitsAndBytesConfig

    if mode == "4bit":
        config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return LoadPlan(
        mode,
        {"quantization_config": config, "dtype": compute, "device_map": {"": 0}},
    )
