"""A run folder's ``metrics.jsonl`` and ``config.json`` come back from other machines as
files: the benches that read them stop on a broken one with the file and line named."""

import json
from pathlib import Path

import pytest

from bench.alignment_table import summarise
from bench.fedbiot_sweep import COMMON, previous_sweep
from bench.federation_runs import finished


def test_a_broken_metrics_line_is_named_with_its_file_and_line(tmp_path: Path) -> None:
    run = tmp_path / "b0.2-p100"
    run.mkdir()
    metrics = run / "metrics.jsonl"
    assert not finished(run, 2)  # not started yet: simply not finished
    metrics.write_text(json.dumps({"round": 0}) + "\n\n" + json.dumps({"round": 1}) + "\n")
    assert not finished(run, 2) and finished(run, 1)  # the blank line is skipped
    metrics.write_text(json.dumps({"round": 0}) + "\n" + '{"round": 1, "eval_adapfu_ba')
    with pytest.raises(SystemExit, match=rf"{metrics}, line 2: not JSON"):
        finished(run, 2)
    metrics.write_text(json.dumps({"round": 0}) + "\n" + json.dumps({"round": "1"}) + "\n")
    with pytest.raises(SystemExit, match=rf"{metrics}, line 2: not a round's row"):
        finished(run, 1)


def test_a_run_folder_without_a_run_config_is_named(tmp_path: Path) -> None:
    run = tmp_path / "align-nodp"
    run.mkdir()
    with pytest.raises(SystemExit, match=rf"{run / 'config.json'}: no such file"):
        summarise(run)
    (run / "config.json").write_text('{"run_config": ')
    with pytest.raises(SystemExit, match=rf"{run / 'config.json'}: not JSON"):
        summarise(run)
    (run / "config.json").write_text(json.dumps({"run_config": ["stage", "sft"]}))
    with pytest.raises(SystemExit, match=rf"{run / 'config.json'}: no 'run_config' object"):
        summarise(run)
    (run / "config.json").write_text(json.dumps({"run_config": {"stage": "sft"}}))
    with pytest.raises(SystemExit, match=rf"{run / 'config.json'}: run_config has no 'dpo-rounds'"):
        summarise(run)
    settings = {"stage": "sft", "dpo-rounds": 1, "num-server-rounds": 2, "dp-clipping-norm": 0.0,
                "dp-noise-multiplier": 1.0}  # fmt: skip
    (run / "config.json").write_text(json.dumps({"run_config": settings}))
    with pytest.raises(SystemExit, match=rf"{run / 'metrics.jsonl'}: no such file"):
        summarise(run)


def test_a_broken_earlier_sweep_is_named_not_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "sweep.json"
    path.write_text('{"model": "smollm2-135m", "points": {')
    with pytest.raises(SystemExit, match=rf"{path}: not JSON"):
        previous_sweep(path, "smollm2-135m", COMMON)
    path.write_text(json.dumps({"model": "smollm2-135m", "common": COMMON, "points": []}))
    with pytest.raises(SystemExit, match=rf"{path}: not a sweep.json"):
        previous_sweep(path, "smollm2-135m", COMMON)
    assert path.read_text().endswith('"points": []}')
