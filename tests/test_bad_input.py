"""Task data that cannot be split as configured fails before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from federation.methods import method_plan
from federation.run_config import ConfigError, RunConfig
from server_app.app import run_federation
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


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"distill-lr": float("inf")}, "distill-lr=inf must be finite"),
        ({"learning-rate": float("nan")}, "learning-rate=nan must be finite"),
        ({"round-timeout": float("-inf")}, "round-timeout=-inf must be finite"),
        ({"weight-decay": -0.1}, "weight-decay must be >= 0"),
        ({"seed": -1}, "seed=-1 must be in [0, 2**32)"),
        ({"run-name": "../../x"}, "run-name='../../x' must be a plain folder name"),
        ({"run-name": "a/b"}, "run-name='a/b' must be a plain folder name"),
        ({"run-name": ".."}, "run-name='..' must be a plain folder name"),
        ({"max-update-norm": -1.0}, "max-update-norm must be >= 0"),
        ({"max-num-examples": -5}, "max-num-examples must be >= 0"),
        ({"fidelity-examples": -1}, "fidelity-examples must be >= 0"),
        ({"no-such-key": 1}, "unknown run-config key(s) no-such-key;"),
    ],
)
def test_a_config_that_cannot_work_is_refused_naming_the_key(
    values: dict[str, object], named: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        RunConfig.from_flower(values)
    assert named in str(refused.value)


def test_an_adapter_larger_than_the_model_is_refused_before_the_run_folder(
    tmp_path: Path,
) -> None:
    """tiny-llama has 8 blocks: adapter-layers=9 used to fail after the model loaded,
    leaving an empty run folder behind."""
    config = RunConfig(model="tiny-llama", adapter_layers=9, output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"adapter-layers=9 must be between 1 and 7"):
        run_federation(None, config)  # type: ignore[arg-type] - refused before the grid
    assert list(tmp_path.iterdir()) == []


def test_example_cap_defaults_to_the_task_size(tmp_path: Path) -> None:
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(7)]
    assert RunConfig(task=_task_file(tmp_path, rows)).example_cap() == 7
    assert RunConfig(task=_task_file(tmp_path, rows), max_num_examples=3).example_cap() == 3
