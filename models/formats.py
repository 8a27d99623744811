"""The numeric formats a run config may name for the frozen weights, without torch.

A run config is checked in processes that load no model (a SuperNode answering the server's
model offer, the run's release), and importing torch and transformers costs seconds there;
``models.precision`` and ``models.quantization`` act on these names.
"""

from __future__ import annotations

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATION_MODES = ("none", "8bit", "4bit")
