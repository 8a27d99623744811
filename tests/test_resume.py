"""A server that stops after round 1 and is resumed ends where an uninterrupted run ends; a
finished run is not resumed again, nor one from a damaged checkpoint or with another config;
one that died while exporting is finished."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from federation.run_config import ConfigError, RunConfig
from server_app.app import run_federation
from server_app.checkpoint import CheckpointError, from_plain, read_checkpoint
from tests.flower_runtime import LocalFederation, tiny_run_config

pytestmark = pytest.mark.xdist_group("resume")


def _config(out: Path, name: str, rounds: int, **extra: object) -> dict[str, object]:
    # FedAdam: the server optimizer's state must survive the restart too.
    config = tiny_run_config(
        out,
        name,
        algorithm="fedadam",
        fedopt_eta=0.01,
        num_server_rounds=rounds,
        eval_tasks="",
        distill_steps=2,
    )
    return {**config, **extra}


def _run(federation: LocalFederation, config: dict[str, object]) -> list[dict]:
    rows = federation.run_to_end(config, supernodes=2)
    # Equal weights need equal rounds: a client lost to the machine's load is no resume bug.
    assert all(r.get("clients_failed", 0) == 0 for r in rows), rows
    return rows


def test_resumed_run_matches_the_uninterrupted_one(
    federation: LocalFederation, tmp_path: Path
) -> None:
    whole_rows = _run(federation, _config(tmp_path, "whole", 2))
    _run(federation, _config(tmp_path, "stopped", 1))  # the server is gone after round 1
    stopped = tmp_path / "stopped"
    assert (stopped / "checkpoints" / "round-1.pt").is_file()
    rows = _run(federation, _config(tmp_path, "ignored", 2, **{"resume-from": str(stopped)}))
    assert [r["round"] for r in rows] == [0, 1, 2]
    # Same losses round by round first: where they part says which round went wrong.
    for key in ("train_loss", "distill_loss"):
        assert [r.get(key) for r in rows[1:]] == pytest.approx(
            [r.get(key) for r in whole_rows[1:]], rel=1e-5
        ), key
    assert (stopped / "config-resumed-1.json").is_file()
    assert not (tmp_path / "ignored").exists()  # a resumed run writes into its own folder

    whole = read_checkpoint(tmp_path / "whole" / "checkpoints" / "latest.pt")
    resumed = read_checkpoint(stopped / "checkpoints" / "latest.pt")
    assert whole["round"] == resumed["round"] == 2
    for part in ("adapter", "emulator"):
        assert whole[part].keys() == resumed[part].keys()
        for name, value in whole[part].items():
            torch.testing.assert_close(resumed[part][name], value, rtol=1e-5, atol=1e-6)
    # The FedAdam moments were carried over, not restarted.
    whole_v, resumed_v = (from_plain(c["strategy"]["v_t"]) for c in (whole, resumed))
    for name, value in whole_v.items():
        torch.testing.assert_close(torch.as_tensor(resumed_v[name]), torch.as_tensor(value))

    # Refusals happen before the grid is used, so the ServerApp's entry is called directly
    # (a run that fails through `flwr run` exits non-zero: tests/test_run_checked.py).
    # A resume that would compute something else is refused, naming the keys.
    extra = {"algorithm": "fedavg", "lora-alpha": 32, "resume-from": str(stopped)}
    changed = RunConfig.from_flower(_config(tmp_path, "changed", 3, **extra))
    refused = "algorithm: 'fedadam' -> 'fedavg'; lora-alpha: 16 -> 32"
    with pytest.raises(ConfigError, match=re.escape(refused)):
        run_federation(None, changed)  # type: ignore[arg-type] - refused before the grid
    # 64 flipped bytes in latest.pt are refused, naming the file.
    damaged = tmp_path / "damaged"
    shutil.copytree(stopped, damaged)
    latest = damaged / "checkpoints" / "latest.pt"
    data = bytearray(latest.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    latest.write_bytes(bytes(data))
    at_damaged = RunConfig.from_flower(_config(tmp_path, "d", 3, **{"resume-from": str(damaged)}))
    with pytest.raises(CheckpointError, match=re.escape(f"{latest} fails its SHA-256 check")):
        run_federation(None, at_damaged)  # type: ignore[arg-type]
    assert len((damaged / "metrics.jsonl").read_text().splitlines()) == 3

    # Resuming the finished run is refused before any model is loaded; nothing is added.
    again = _config(tmp_path, "again", 2, **{"resume-from": str(stopped)})
    with pytest.raises(ConfigError, match="leaves nothing to do"):
        run_federation(None, RunConfig.from_flower(again))  # type: ignore[arg-type]
    assert len((stopped / "metrics.jsonl").read_text().splitlines()) == 3

    # A server that died while exporting, after its last checkpoint: the half-written export
    # never took the final name, and resuming the checkpoint finishes the export. With no
    # round left the grid is never used, so the ServerApp's entry is called directly.
    shutil.rmtree(stopped / "adapfu")
    (stopped / ".adapfu-partial-crashed").mkdir()
    assert run_federation(None, RunConfig.from_flower(again)) == stopped  # type: ignore[arg-type]
    assert (stopped / "adapfu" / "config.json").is_file()
    assert not list(stopped.glob(".adapfu-partial-*"))
    assert len((stopped / "metrics.jsonl").read_text().splitlines()) == 3
