"""Checkpoint files on their own: plain data loaded with ``weights_only``, a SHA-256 that
refuses flipped bytes, and a resume config that may change only where and how long it runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from federation.run_config import ConfigError, RunConfig
from models.fedbiot_models import FedBiOTModels
from server_app.checkpoint import (
    CheckpointError,
    check_resume_config,
    load_checkpoint,
    restore,
    save_checkpoint,
)
from strategies.algorithms import strategy_class
from tests.tiny import tiny_fedbiot_models


@pytest.fixture(scope="module")
def models() -> FedBiOTModels:
    return tiny_fedbiot_models()


def _strategy(models: FedBiOTModels, algorithm: str) -> object:
    cls, params = strategy_class(RunConfig(algorithm=algorithm))
    return cls(
        models=models,
        distiller=None,
        distill_steps=0,
        stage=lambda r: "sft",
        min_train_nodes=2,
        min_available_nodes=2,
        **params,
    )


def _flip(path: Path, offset: int, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_fedavgm_and_scaffold_state_round_trip_through_weights_only_files(
    models: FedBiOTModels, tmp_path: Path
) -> None:
    fedavgm = _strategy(models, "fedavgm")
    fedavgm.momentum_vector = [np.full((3, 2), 0.145, np.float32), np.arange(4.0)]
    save_checkpoint(tmp_path / "a", 2, models, fedavgm, None, RunConfig(algorithm="fedavgm"))
    # Loadable without our code: no pickled objects, only tensors and plain data.
    assert torch.load(tmp_path / "a" / "latest.pt", weights_only=True)["format"]
    state, _ = load_checkpoint(tmp_path / "a" / "latest.pt")
    assert state["config"]["algorithm"] == "fedavgm"
    resumed = _strategy(models, "fedavgm")
    assert restore(state, models, resumed, None) == 2
    for got, want in zip(resumed.momentum_vector, fedavgm.momentum_vector, strict=True):
        assert got.dtype == want.dtype and np.array_equal(got, want)

    scaffold = _strategy(models, "scaffold")
    scaffold.control = {k: torch.full_like(v, 0.5) for k, v in models.adapter_state().items()}
    save_checkpoint(tmp_path / "b", 1, models, scaffold, None, RunConfig(algorithm="scaffold"))
    resumed = _strategy(models, "scaffold")
    restore(load_checkpoint(tmp_path / "b")[0], models, resumed, None)
    assert resumed.control.keys() == scaffold.control.keys()
    assert all(torch.equal(resumed.control[k], v) for k, v in scaffold.control.items())


def test_flipped_bytes_in_latest_pt_are_refused_naming_the_file(
    models: FedBiOTModels, tmp_path: Path
) -> None:
    strategy = _strategy(models, "fedavgm")
    strategy.momentum_vector = [np.full((64, 64), 0.145, np.float32)]
    save_checkpoint(tmp_path, 1, models, strategy, None, RunConfig())
    latest = tmp_path / "latest.pt"
    _flip(latest, latest.stat().st_size // 2)
    with pytest.raises(CheckpointError, match=f"{latest} fails its SHA-256 check"):
        load_checkpoint(tmp_path)
    # The round file of the same round is intact and still resumes.
    assert load_checkpoint(tmp_path / "round-1.pt")[0]["round"] == 1
    latest.write_bytes(latest.read_bytes()[:200])  # truncated: not even a zip file
    with pytest.raises(CheckpointError, match=f"{latest} is not a readable checkpoint"):
        load_checkpoint(latest)


def test_a_resume_that_changes_the_math_is_refused_naming_the_keys() -> None:
    saved = RunConfig(algorithm="fedadam", seed=1).to_dict()
    path = Path("run/checkpoints/latest.pt")
    changed = RunConfig(algorithm="fedavg", lora_alpha=32, seed=1, num_server_rounds=9)
    with pytest.raises(ConfigError, match=r"algorithm: 'fedadam' -> 'fedavg'; lora-alpha: 16 ->"):
        check_resume_config(saved, changed, path)
    # Where and how long it runs may change; the rest may not.
    check_resume_config(
        saved,
        RunConfig(
            algorithm="fedadam",
            seed=1,
            num_server_rounds=9,
            round_timeout=60.0,
            output_dir="elsewhere",
            resume_from="run",
            num_threads=1,
            gradient_checkpointing=True,
        ),
        path,
    )
    with pytest.raises(ConfigError, match="dtype: 'auto' -> 'bfloat16'"):
        check_resume_config(saved, RunConfig(algorithm="fedadam", seed=1, dtype="bfloat16"), path)
    with pytest.raises(ConfigError, match="seed: 1 -> 2"):
        check_resume_config(saved, RunConfig(algorithm="fedadam", seed=2), path)
    # A schedule is spread over the rounds: more rounds would change the rates already used.
    cosine = RunConfig(lr_scheduler="cosine", num_server_rounds=2).to_dict()
    with pytest.raises(ConfigError, match="num-server-rounds: 2 -> 5"):
        check_resume_config(cosine, RunConfig(lr_scheduler="cosine", num_server_rounds=5), path)
