"""Server checkpoints: everything a run needs to continue after the server dies.

Written after every round to ``<run>/checkpoints/round-<r>.pt`` (and ``latest.pt``): the
round number, the adapter and emulator LoRA, the aggregation algorithm's state (FedAvgM
momentum, FedAdam/FedYogi/FedAdagrad moments, SCAFFOLD control variates), the fixed DPO
reference, the distiller's optimizer state and how many public batches it has used, and the
Python, NumPy and torch random states. ``resume-from`` loads one and the run continues with
the next round.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from models.distillation import EmulatorDistiller
from models.fedbiot_models import FedBiOTModels

# Attributes of Flower's strategies (and ours) that carry state from round to round.
_STRATEGY_STATE = (
    "m_t",
    "v_t",
    "current_arrays",
    "momentum_vector",
    "control",
    "client_arrays",
    "dp_accountant_state",
    "dpo_reference",
)


def _plain(value: Any) -> Any:
    """ArrayRecords become dicts of NumPy arrays, so the checkpoint needs no Flower types."""
    if isinstance(value, ArrayRecord):
        return {"__arrayrecord__": {k: v.numpy() for k, v in value.items()}}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _restore(value: Any) -> Any:
    if isinstance(value, dict) and "__arrayrecord__" in value:
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in value["__arrayrecord__"].items()})
    if isinstance(value, dict):
        return {k: _restore(v) for k, v in value.items()}
    return value


def save_checkpoint(
    directory: Path,
    server_round: int,
    models: FedBiOTModels,
    strategy: Any,
    distiller: EmulatorDistiller | None,
) -> Path:
    """Write ``round-<r>.pt`` and ``latest.pt`` with the same content, each atomically."""
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "round": server_round,
        "adapter": models.adapter_state(),
        "emulator": models.emulator_state(),
        "strategy": {
            name: _plain(getattr(strategy, name))
            for name in _STRATEGY_STATE
            if getattr(strategy, name, None) is not None
        },
        "distiller": None
        if distiller is None
        else {
            "optimizer": distiller.optimizer.state_dict(),
            "batches_used": distiller.batches_used,
        },
        "rng": {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        },
    }
    target = directory / f"round-{server_round}.pt"
    tmp = directory / "checkpoint.tmp"
    torch.save(state, tmp)  # serialised once; latest.pt is a copy of the same bytes
    shutil.copyfile(tmp, directory / "latest.tmp")
    tmp.replace(target)
    (directory / "latest.tmp").replace(directory / "latest.pt")
    return target


def load_checkpoint(path: str | Path) -> tuple[dict[str, Any], Path]:
    """A checkpoint (a file, or a run folder's ``checkpoints/latest.pt``) and its run folder."""
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        nested = path / "checkpoints"
        path = (nested if nested.is_dir() else path) / "latest.pt"
    if not path.is_file():
        raise FileNotFoundError(f"resume-from: no checkpoint at {path}")
    return torch.load(path, weights_only=False), path.parent.parent


def restore(
    state: dict[str, Any],
    models: FedBiOTModels,
    strategy: Any,
    distiller: EmulatorDistiller | None,
) -> int:
    """Put a checkpoint back into the server's objects; returns its round number."""
    models.set_adapter(state["adapter"])
    if state["emulator"]:
        models.set_emulator(state["emulator"])
    for name, value in state["strategy"].items():
        setattr(strategy, name, _restore(value))
    if distiller is not None and state["distiller"] is not None:
        distiller.optimizer.load_state_dict(state["distiller"]["optimizer"])
        distiller.skip_batches(state["distiller"]["batches_used"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    return int(state["round"])
