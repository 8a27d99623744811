"""A run's results folder: config.json (config, versions, layout) and metrics.jsonl."""

from __future__ import annotations

import importlib.metadata
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

from models.layout import Layout
from server_app.run_config import RunConfig

_PACKAGES = (
    "flwr",
    "flwr-datasets",
    "torch",
    "transformers",
    "peft",
    "datasets",
    "accelerate",
    "numpy",
    "safetensors",
)


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that decide a run's numbers."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


class RunRecorder:
    """Creates ``<output-dir>/<run-name>/`` and appends one JSON object per round."""

    def __init__(self, config: RunConfig) -> None:
        name = config.run_name or time.strftime(f"{config.method}-%Y%m%d-%H%M%S")
        self.dir = Path(config.output_dir).expanduser().resolve() / name
        if (self.dir / "metrics.jsonl").exists():
            raise FileExistsError(f"{self.dir} already holds a run; pick another run-name")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = config

    def write_config(self, layout: Layout, extra: dict[str, Any]) -> None:
        document = {
            "run_config": self.config.to_dict(),
            "versions": package_versions(),
            "layout": layout.to_dict(),
            "adapter_blocks": list(layout.adapter_blocks),
            "emulator_blocks": list(layout.emulator_blocks),
            **extra,
        }
        (self.dir / "config.json").write_text(json.dumps(document, indent=2))

    def append_round(self, record: dict[str, Any]) -> None:
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in record.items()
        }
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(clean, sort_keys=True) + "\n")
