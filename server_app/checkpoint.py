"""Server checkpoints: everything a run needs to continue after the server dies.

Written after every round to ``<run>/checkpoints/round-<r>.pt`` (and ``latest.pt``): the
round number, the adapter and emulator LoRA, the aggregation algorithm's state (FedAvgM
momentum, FedAdam/FedYogi/FedAdagrad moments, SCAFFOLD control variates), the fixed DPO
reference, the distiller's optimizer state and how many public batches it has used, and the
Python, NumPy and torch random states, and the run config. ``resume-from`` loads one and the
run continues with the next round.

Everything is stored as tensors and plain data, so a checkpoint loads with
``torch.load(weights_only=True)`` (no pickled code runs); the state is serialised once and
written inside an envelope with its SHA-256, checked on load, so flipped bytes never resume.
A resume whose config differs from the checkpoint's in a key outside ``RESUMABLE_KEYS`` is
refused: one metrics series never mixes two configurations.
"""

from __future__ import annotations

import hashlib
import io
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from federation.run_config import ConfigError, RunConfig
from models.distillation import EmulatorDistiller
from models.fedbiot_models import FedBiOTModels
from models.wire import array_tensor, to_record
from server_app.superlink_guard import check_superlink

FORMAT = "fedbiot-checkpoint-2"
# Run-config keys a resume may change: where and how long it runs, not what it computes.
RESUMABLE_KEYS = frozenset(
    {
        "num-server-rounds",
        "round-timeout",
        "output-dir",
        "run-name",
        "checkpoint-every",
        "save-every-round",
        "report-to",
        "eval-every",
        "resume-from",
        "data-dir",
        "cache-dir",
        "num-threads",
        "device",
        "gradient-checkpointing",  # recomputes activations, computes the same gradients
    }
)


class CheckpointError(RuntimeError):
    """A checkpoint file that is damaged, of another format, or not ours."""


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


def to_plain(value: Any) -> Any:
    """Flower and NumPy values as tensors and plain data (what ``weights_only`` loads)."""
    if isinstance(value, ArrayRecord):  # bf16 arrays too (not NumPy on the wire, see models.wire)
        return {"__arrayrecord__": {k: array_tensor(k, v).contiguous() for k, v in value.items()}}
    if isinstance(value, np.ndarray):
        return {"__ndarray__": _tensor(value)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_plain(v) for v in value)
    return value


def _tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array).copy())


def from_plain(value: Any) -> Any:
    """The values ``to_plain`` stored, as Flower and NumPy types again."""
    if isinstance(value, dict) and "__arrayrecord__" in value:
        return to_record(value["__arrayrecord__"])
    if isinstance(value, dict) and "__ndarray__" in value:
        return value["__ndarray__"].numpy()
    if isinstance(value, dict):
        return {k: from_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(from_plain(v) for v in value)
    return value


def check_resume_config(saved: dict[str, Any], config: RunConfig, path: Path) -> None:
    """Refuse a resume whose config computes something else than the checkpoint's run.

    ``num-server-rounds`` may change only with a constant learning rate: a schedule is
    spread over the rounds, so more rounds would change the rates already used.
    """
    current = config.to_dict()
    defaults = RunConfig().to_dict()  # keys added since the checkpoint keep their default
    may_change = RESUMABLE_KEYS
    if config.lr_scheduler != "constant":
        may_change = may_change - {"num-server-rounds"}
    differing = sorted(
        key
        for key in current.keys() | saved.keys()
        if key not in may_change and saved.get(key, defaults.get(key)) != current.get(key)
    )
    if differing:
        changes = "; ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in differing)
        raise ConfigError(
            f"resume-from {path}: the run config differs from the checkpoint's in {changes}. "
            f"A resume may change only {', '.join(sorted(may_change))}; start a new run "
            "for another configuration"
        )


def save_checkpoint(
    directory: Path,
    server_round: int,
    models: FedBiOTModels,
    strategy: Any,
    distiller: EmulatorDistiller | None,
    config: RunConfig | None = None,
) -> Path:
    """Write ``round-<r>.pt`` and ``latest.pt`` with the same content, each atomically."""
    check_superlink()
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "round": server_round,
        "adapter": models.adapter_state(),
        "emulator": models.emulator_state(),
        "strategy": {
            name: to_plain(getattr(strategy, name))
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
            "numpy": to_plain(np.random.get_state()),
            "torch": torch.get_rng_state(),
        },
        "config": None if config is None else config.to_dict(),
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    envelope = {
        "format": FORMAT,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
    }
    target = directory / f"round-{server_round}.pt"
    tmp = directory / "checkpoint.tmp"
    torch.save(envelope, tmp)  # serialised once; latest.pt is a copy of the same bytes
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
    return read_checkpoint(path), path.parent.parent


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The state in a checkpoint file, after its SHA-256 matched; never runs pickled code."""
    earlier = "resume from an earlier round-<r>.pt of the same folder"
    try:
        envelope = torch.load(path, weights_only=True)
        if not isinstance(envelope, dict) or envelope.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a {FORMAT} checkpoint")
        payload = envelope["payload"].numpy().tobytes()
        computed = hashlib.sha256(payload).hexdigest()
        if computed != envelope["sha256"]:
            raise CheckpointError(
                f"{path} fails its SHA-256 check (stored {envelope['sha256']}, "
                f"computed {computed}): the file is damaged; {earlier}"
            )
        return torch.load(io.BytesIO(payload), weights_only=True)
    except CheckpointError:
        raise
    except Exception as err:  # torch's unpickler, zip reader or a missing entry
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {err}); {earlier}"
        ) from err


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
        setattr(strategy, name, from_plain(value))
    if distiller is not None and state["distiller"] is not None:
        distiller.optimizer.load_state_dict(state["distiller"]["optimizer"])
        distiller.skip_batches(state["distiller"]["batches_used"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(from_plain(state["rng"]["numpy"]))
    torch.set_rng_state(state["rng"]["torch"])
    return int(state["round"])
