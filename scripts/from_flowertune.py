"""Translate a FlowerTune app's run config into this app's ``--run-config`` string.

    python scripts/from_flowertune.py path/to/flowertune/pyproject.toml [--method fedbiot]
    make run RUN_CONFIG="$(python scripts/from_flowertune.py ../my-flowertune/pyproject.toml)"

FlowerTune nests its keys (``model.name``, ``train.learning-rate-max``,
``strategy.fraction-train``); this app keeps flat keys (README, Run configuration, says
why). Every FlowerTune key is either translated, reported on stderr as having no
counterpart (logging and Trainer checkpoint settings: this app writes per-round outputs), or
refused naming the key when dropping it would change what is trained.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from pathlib import Path
from typing import Any

from flwr.common.config import flatten_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from federation.run_config import ConfigError, RunConfig, run_config_arg  # noqa: E402 - after the path

TRAINER = "train.training-arguments."
# FlowerTune key -> this app's key, where the value carries over unchanged.
SAME_VALUE = {
    "num-server-rounds": "num-server-rounds",
    "model.name": "model",
    "model.gradient-checkpointing": "gradient-checkpointing",
    "model.lora.peft-lora-r": "lora-r",
    "model.lora.peft-lora-alpha": "lora-alpha",
    "train.save-every-round": "save-every-round",
    "train.learning-rate-max": "learning-rate",
    "train.learning-rate-min": "learning-rate-min",
    "train.seq-length": "seq-length",
    TRAINER + "per-device-train-batch-size": "batch-size",
    TRAINER + "gradient-accumulation-steps": "grad-accum-steps",
    TRAINER + "max-steps": "local-steps",
    TRAINER + "gradient-checkpointing": "gradient-checkpointing",
    "strategy.fraction-train": "fraction-train",
    "strategy.fraction-fit": "fraction-train",  # older FlowerTune templates
    "strategy.fraction-evaluate": "fraction-evaluate",
    "static.dataset.name": "task",  # FlowerTune's [tool.flwr.app.config.static]
    "dataset.name": "task",
}
# Settings of the Hugging Face Trainer's own logging and checkpointing: no counterpart here.
NO_COUNTERPART = {
    TRAINER + "output-dir",
    TRAINER + "logging-steps",
    TRAINER + "save-steps",
    TRAINER + "save-total-limit",
}


def _quantization(value: Any) -> str:
    if value in (4, 8):
        return f"{value}bit"
    if value in (0, 16, 32, "", "none"):
        return "none"
    raise ConfigError(f"model.quantization={value!r}: FlowerTune's 4 or 8 (bits) expected")


def translate(flowertune: dict[str, Any], method: str = "fedit") -> tuple[dict[str, Any], list]:
    """This app's run-config values for FlowerTune's flat (dotted) config, and the keys
    dropped with the reason. ``method='fedit'`` (LoRA on the whole model, FedAvg) is what a
    FlowerTune app trains; ``fedbiot`` keeps the model on the server."""
    values: dict[str, Any] = {"method": method, "lr-scheduler": "cosine"}
    dropped: list[tuple[str, str]] = []
    source: dict[str, str] = {}  # this app's key -> the FlowerTune key that set it
    for key, value in flowertune.items():
        if key in SAME_VALUE:
            target = SAME_VALUE[key]
            if target in source and values[target] != value:
                raise ConfigError(
                    f"{key}={value!r} contradicts {source[target]}={values[target]!r} "
                    f"(both set {target})"
                )
            values[target], source[target] = value, key
        elif key == "model.quantization":
            values["quantization"] = _quantization(value)
        elif key in NO_COUNTERPART:
            dropped.append((key, "Trainer logging/checkpoints; outputs here are per round"))
        elif key == TRAINER + "learning-rate":
            dropped.append((key, "set per round from learning-rate-max/-min (cosine)"))
        elif key == TRAINER + "lr-scheduler-type":
            if value != "constant":
                raise ConfigError(f"{key}={value!r}: only a constant rate within a round exists")
            dropped.append((key, "the rate is constant within a round here too"))
        elif key == TRAINER + "num-train-epochs":
            if not flowertune.get(TRAINER + "max-steps"):
                raise ConfigError(f"{key}: this app trains max-steps (local-steps) per round")
            dropped.append((key, "max-steps overrides it, as in the Hugging Face Trainer"))
        else:
            raise ConfigError(f"FlowerTune key {key!r} has no translation")
    return values, dropped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pyproject", type=Path, help="a FlowerTune app's pyproject.toml")
    parser.add_argument("--method", default="fedit", help="this app's method (default fedit)")
    args = parser.parse_args(argv)
    try:
        with open(args.pyproject, "rb") as f:
            app = tomllib.load(f).get("tool", {}).get("flwr", {}).get("app", {})
        if "config" not in app:
            raise ConfigError("no [tool.flwr.app.config] table")
        flowertune = flatten_dict(app["config"])
        values, dropped = translate(flowertune, args.method)
        with open(ROOT / "pyproject.toml", "rb") as f:
            defaults = flatten_dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])
        RunConfig.from_flower({**defaults, **values})
        line = run_config_arg(values)
    except (OSError, tomllib.TOMLDecodeError, ConfigError) as error:
        print(f"from_flowertune: {args.pyproject}: {error}", file=sys.stderr)
        return 2
    for key, why in dropped:
        print(f"from_flowertune: dropped {key} ({why})", file=sys.stderr)
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
