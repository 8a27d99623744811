"""The memory plan against what a real client step allocates."""

from __future__ import annotations

import pytest

from bench.memory_plan import Setup, load_config, main, measure_client, plan
from models.blocks import extract_blocks, get_blocks
from models.layout import fedbiot_layout
from models.loading import load_model


def test_planned_step_memory_is_within_20_percent_of_the_measured_peak() -> None:
    setup = Setup("tiny-llama", batch=4, seq=64)
    estimated = plan(setup, load_config("tiny-llama"))["client"]["step_extra"]
    measured = measure_client(setup)["step_extra"]
    assert 0.8 <= estimated / measured <= 1.2, (estimated, measured)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_frozen_weights_are_the_loaded_models_parameter_bytes(dtype: str) -> None:
    setup = Setup("tiny-llama", dtype=dtype, bits=16 if dtype == "bfloat16" else 32)
    model, _ = load_model("tiny-llama")  # float32
    layout = fedbiot_layout(len(get_blocks(model)), setup.adapter_layers, setup.drop_rate)
    client = extract_blocks(model, layout.kept_blocks)
    fp32 = sum(p.numel() * p.element_size() for p in client.parameters())
    planned = plan(setup, load_config("tiny-llama"))["client"]["frozen_weights"]
    assert planned == (fp32 if dtype == "float32" else fp32 / 2)


def test_an_unknown_method_is_named() -> None:
    with pytest.raises(ValueError, match="method='fedx'"):
        main(["--model", "tiny-llama", "--method", "fedx"])
