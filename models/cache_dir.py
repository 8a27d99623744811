"""Where this machine keeps converted models, tokenizers and node stores, without torch:
the weight store reads it in processes that load no model."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Where converted models live: ``$FEDBIOT_CACHE`` or ``~/.cache/fedbiot``."""
    root = os.environ.get("FEDBIOT_CACHE") or Path.home() / ".cache" / "fedbiot"
    return Path(root)
