"""Experiment tracking with Weights & Biases in offline mode (no network): every numeric
``metrics.jsonl`` value reaches the run's ``.wandb`` file at its round, and the run is
finished with the ServerApp's outcome (TensorBoard, from a real simulation:
tests/test_outputs.py)."""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest

from federation.run_config import ConfigError
from server_app.tracking import check_tracking, close_trackers, open_tracker

wandb_internal_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2")

# The .wandb file is a LevelDB-style log: a 7-byte file header, then 32 KiB blocks of
# records, each with a 7-byte header (CRC32, length, kind: 1 full, 2 first, 3 middle, 4 last).
_BLOCK, _HEADER = 32768, 7


def wandb_records(path: Path) -> list:
    """The protobuf records of a ``.wandb`` file (wandb no longer ships a Python reader)."""
    data, pos, pieces, records = path.read_bytes(), _HEADER, b"", []
    assert data[:4] == b":W&B"
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # a block's tail too short for a header is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0:
            break
        pieces += data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
            pieces = b""
    return records


def offline_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failed: bool) -> list:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    run_dir = tmp_path / "fedbiot-run"
    run_dir.mkdir()
    tracker = open_tracker("wandb", run_dir, {"seed": 7, "method": "fedbiot"}, None)
    tracker.log({"round": 0, "distill_loss": 1.6, "stage": "prealign"})
    tracker.log({"round": 1, "train_loss": 5.43, "clients_failed": 0, "ok": True})
    close_trackers(failed)
    (path,) = (run_dir / "wandb").glob("offline-run-*/run-fedbiot-run.wandb")
    # wandb-core writes the file from its own process: its last records (the exit) can land
    # just after finish() returns, so the file is read until they are there (or 30 s).
    deadline = time.monotonic() + 30
    records = wandb_records(path)
    while not _exits(records) and time.monotonic() < deadline:
        time.sleep(0.2)
        records = wandb_records(path)
    return records


def _exits(records: list) -> list:
    return [r.exit for r in records if r.WhichOneof("record_type") == "exit"]


def _exit_code(records: list) -> int:
    """The run's one exit record's code; the record types read, if there is not one."""
    exits = _exits(records)
    assert len(exits) == 1, [r.WhichOneof("record_type") for r in records]
    return exits[0].exit_code


def test_wandb_offline_logs_every_numeric_value_at_its_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = offline_run(tmp_path, monkeypatch, failed=False)
    history = [
        {
            item.key or "/".join(item.nested_key): json.loads(item.value_json)
            for item in r.history.item
        }
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    logged = [{k: v for k, v in row.items() if not k.startswith("_")} for row in history]
    assert logged == [{"distill_loss": 1.6}, {"train_loss": 5.43, "clients_failed": 0.0}]
    assert [row["_step"] for row in history] == [0, 1]
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_id == "fedbiot-run" and run.project == "fedbiot"
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["seed"] == 7 and config["method"] == "fedbiot"
    assert _exit_code(records) == 0


def test_a_failed_run_finishes_its_wandb_run_with_exit_code_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = offline_run(tmp_path, monkeypatch, failed=True)
    assert _exit_code(records) == 1


def test_a_missing_tracking_package_names_the_key_and_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # find_spec then reports it missing
    with pytest.raises(ConfigError, match=r"report-to='wandb'.*pip install '\.\[wandb\]'"):
        check_tracking("wandb")
