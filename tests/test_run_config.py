"""Run-config parsing: defaults from pyproject, and clear errors that name the key."""

import tomllib

import pytest
from flwr.common.config import parse_config_args

from federation.run_config import ConfigError, RunConfig, run_config_arg
from tests.flower_runtime import REPO

REQUIRED_KEYS = (
    "method",
    "model",
    "task",
    "public-data",
    "num-partitions",
    "partitioner",
    "num-server-rounds",
    "fraction-train",
    "local-steps",
    "batch-size",
    "seq-length",
    "learning-rate",
    "lora-r",
    "lora-alpha",
    "adapter-layers",
    "drop-rate",
    "prealign-steps",
    "distill-steps",
    "kd-lambda",
    "prox-epsilon",
    "seed",
    "output-dir",
)


def _pyproject_config() -> dict:
    document = tomllib.loads((REPO / "pyproject.toml").read_text())
    return document["tool"]["flwr"]["app"]["config"]


def test_pyproject_holds_every_key_and_matches_the_dataclass_defaults() -> None:
    values = _pyproject_config()
    assert set(REQUIRED_KEYS) <= set(values)
    assert RunConfig.from_flower(values) == RunConfig()
    assert set(values) == set(RunConfig().to_dict())


def test_integers_are_accepted_for_float_keys() -> None:
    assert RunConfig.from_flower({"learning-rate": 1}).learning_rate == 1.0


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"drop-rat": 0.5}, "unknown run-config key.*drop-rat"),
        ({"drop-rate": 1.0}, "drop-rate=1.0 must be in"),
        ({"drop-rate": "half"}, "drop-rate='half' must be of type float"),
        ({"local-steps": 0}, "local-steps must be >= 1"),
        ({"method": "fedsgd"}, "method='fedsgd'"),
        ({"partitioner": "random"}, "partitioner='random'"),
        ({"distill-hidden-norm": "l1"}, "distill-hidden-norm='l1' must be one of"),
        ({"fraction-train": 0.0}, "fraction-train"),
        ({"seq-length": 8}, "seq-length"),
        ({"lora-r": True}, "lora-r=True must be of type int"),
        ({"stage": "rlhf"}, "stage='rlhf'"),
        ({"stage": "sft+dpo", "num-server-rounds": 2, "dpo-rounds": 2}, "dpo-rounds=2"),
        ({"preference-clients": "first"}, "preference-clients='first'"),
        ({"method": "fedbialign"}, "fedbialign needs depth-table"),
        ({"depth-table": "1,2"}, "depth-table is for method=fedbialign"),
        (
            {"method": "fedbialign", "depth-table": "1,2", "algorithm": "krum"},
            "fedbialign aggregates per block",
        ),
        ({"dp-clipping-norm": 1.0}, "needs max-update-norm-ratio=0"),
        ({"dp-delta": 1.0}, "dp-delta must be in"),
        ({"split-dtype": "int8"}, "split-dtype='int8'"),
        ({"kd-weight": 1.5}, "kd-weight must be in"),
        ({"quantization": "2bit"}, "quantization='2bit'"),
        ({"banking77-eval": "argmax"}, "banking77-eval=.argmax. must be"),
    ],
)
def test_bad_values_name_the_key(override: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunConfig.from_flower({**_pyproject_config(), **override})


def test_stage_schedule_puts_dpo_rounds_last() -> None:
    config = RunConfig.from_flower(
        {"method": "fedbialign", "depth-table": "1,2", "num-server-rounds": 4, "dpo-rounds": 2}
    )
    assert config.resolved_stage == "sft+dpo"
    assert [config.stage_of(r) for r in range(1, 5)] == ["sft", "sft", "dpo", "dpo"]
    assert RunConfig.from_flower({"stage": "dpo"}).stage_of(1) == "dpo"
    assert RunConfig().stage_of(3) == "sft"


def test_run_config_arg_is_parsed_back_by_flower_to_the_same_values() -> None:
    """What tests, the GPU check and from_flowertune hand to ``flwr run --run-config``:
    Flower's own parser reads back every value, quotes, spaces and types included."""
    values = {"run-name": "it's a run", "data-dir": "/tmp/my data", "learning-rate": 1e-05,
              "local-steps": 10, "stream": True, "eval-tasks": "", "note": 'say "hi"'}  # fmt: skip
    assert parse_config_args([run_config_arg(values)]) == values


@pytest.mark.parametrize(
    "value", ["both ' and \"", "a quote ' and a back\\slash", "two\nlines", [1, 2]]
)
def test_run_config_arg_refuses_what_flower_would_misread_naming_the_key(value: object) -> None:
    with pytest.raises(ConfigError, match=r"^run-name="):
        run_config_arg({"seed": 1, "run-name": value})
