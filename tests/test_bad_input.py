"""Task data that cannot be split as configured fails before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server_app.methods import method_plan
from server_app.run_config import ConfigError, RunConfig
from server_app.run_setup import check_task_data


def _task_file(tmp_path: Path, rows: list[dict]) -> str:
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_more_partitions_than_examples_is_a_config_error(tmp_path: Path) -> None:
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(3)]
    config = RunConfig(task=_task_file(tmp_path, rows), num_partitions=5)
    with pytest.raises(ConfigError, match=r"task=.*num-partitions=5 must be between 1 and the 3"):
        check_task_data(config, method_plan(config))
    # The single-client baselines hold everything in one partition: fine.
    central = RunConfig(task=config.task, num_partitions=5, method="central")
    check_task_data(central, method_plan(central))


def test_label_partitioner_without_labels_is_a_config_error() -> None:
    config = RunConfig(task="gsm8k", partitioner="dirichlet")
    with pytest.raises(ConfigError, match="needs the field 'label'"):
        check_task_data(config, method_plan(config))


def test_natural_partitions_from_a_labelled_task_file(tmp_path: Path) -> None:
    rows = [
        {"instruction": f"q{i}", "input": "", "output": "a", "label": "xy"[i % 2]} for i in range(6)
    ]
    config = RunConfig(task=_task_file(tmp_path, rows), partitioner="natural", num_partitions=2)
    check_task_data(config, method_plan(config))  # labels of a custom file are kept
