"""scripts/from_flowertune.py: a FlowerTune app's config becomes a ``--run-config`` string
that Flower accepts against this app's pyproject and that trains the same settings; keys
without a counterpart are named on stderr, and keys whose loss would change training are
refused naming them."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args

from federation.run_config import RunConfig
from scripts.from_flowertune import main

REPO = Path(__file__).resolve().parents[1]
# The settings of FlowerTune's LLM template (`flwr new --framework FlowerTune`).
TEMPLATE = """
[tool.flwr.app.config]
model.name = "HuggingFaceTB/SmolLM2-135M-Instruct"
model.quantization = 4
model.gradient-checkpointing = true
model.lora.peft-lora-r = 32
model.lora.peft-lora-alpha = 64
train.save-every-round = 5
train.learning-rate-max = 5e-5
train.learning-rate-min = 1e-6
train.seq-length = 512
train.training-arguments.output-dir = ""
train.training-arguments.learning-rate = ""
train.training-arguments.per-device-train-batch-size = 16
train.training-arguments.gradient-accumulation-steps = 1
train.training-arguments.logging-steps = 10
train.training-arguments.num-train-epochs = 3
train.training-arguments.max-steps = 10
train.training-arguments.save-steps = 1000
train.training-arguments.save-total-limit = 10
train.training-arguments.gradient-checkpointing = true
train.training-arguments.lr-scheduler-type = "constant"
strategy.fraction-train = 0.1
strategy.fraction-evaluate = 0.0
num-server-rounds = 200

[tool.flwr.app.config.static]
dataset.name = "vicgalle/alpaca-gpt4"
"""


def _translate(tmp_path: Path, text: str, capsys: pytest.CaptureFixture, *extra: str):
    path = tmp_path / "pyproject.toml"
    path.write_text(text)
    code = main([str(path), *extra])
    out, err = capsys.readouterr()
    return code, out.strip(), err


def test_flowertunes_template_runs_here_with_the_same_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    code, run_config, err = _translate(tmp_path, TEMPLATE, capsys)
    assert code == 0, err
    # What `flwr run --run-config` would submit: Flower refuses keys its defaults lack.
    with open(REPO / "pyproject.toml", "rb") as f:
        defaults = flatten_dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])
    config = RunConfig.from_flower(fuse_dicts(defaults, parse_config_args([run_config])))
    assert (config.method, config.model, config.task) == (
        "fedit",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "vicgalle/alpaca-gpt4",
    )
    assert (config.quantization, config.gradient_checkpointing) == ("4bit", True)
    assert (config.lora_r, config.lora_alpha, config.seq_length) == (32, 64, 512)
    assert (config.learning_rate, config.learning_rate_min) == (5e-5, 1e-6)
    assert config.lr_scheduler == "cosine"
    assert (config.batch_size, config.grad_accum_steps, config.local_steps) == (16, 1, 10)
    assert (config.fraction_train, config.fraction_evaluate) == (0.1, 0.0)
    assert (config.num_server_rounds, config.save_every_round) == (200, 5)
    for key in ("logging-steps", "save-steps", "save-total-limit", "num-train-epochs"):
        assert f"dropped train.training-arguments.{key} (" in err
    code, run_config, _ = _translate(tmp_path, TEMPLATE, capsys, "--method", "fedbiot")
    assert code == 0 and run_config.startswith("method='fedbiot' ")


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ('train.training-arguments.lr-scheduler-type = "linear"', "lr-scheduler-type='linear'"),
        ("train.warmup-ratio = 0.1", "'train.warmup-ratio' has no translation"),
        ("model.quantization = 3", "model.quantization=3"),
        (
            "strategy.fraction-fit = 0.5",
            "strategy.fraction-train=0.1 contradicts strategy.fraction-fit=0.5",
        ),
    ],
)
def test_a_key_that_would_change_training_is_refused_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture, line: str, named: str
) -> None:
    key = line.split(" = ")[0]
    text = "\n".join(x for x in TEMPLATE.splitlines() if not x.startswith(key + " "))
    text = text.replace("[tool.flwr.app.config]\n", f"[tool.flwr.app.config]\n{line}\n")
    code, out, err = _translate(tmp_path, text, capsys)
    assert code == 2 and out == ""
    assert named in err and str(tmp_path / "pyproject.toml") in err


def test_epochs_without_max_steps_and_a_file_without_config_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    text = TEMPLATE.replace("train.training-arguments.max-steps = 10\n", "")
    code, _, err = _translate(tmp_path, text, capsys)
    assert code == 2 and "num-train-epochs: this app trains max-steps" in err
    code, _, err = _translate(tmp_path, "[project]\nname = 'x'\n", capsys)
    assert code == 2 and "no [tool.flwr.app.config] table" in err
