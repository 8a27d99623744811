"""Adapter depth from a node's memory budget: the depth table, budgets, measured memory,
and the estimate the server's depth table uses, against measured client steps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from federation.run_config import RunConfig
from federation.step_memory import _peak_extra_bytes, measure_training_memory, module_bytes
from models.blocks import extract_blocks, get_blocks
from models.depth_memory import (
    GB,
    MemoryBudgetError,
    choose_depths,
    node_budget_gb,
    parse_budget_map,
    parse_depth_table,
)
from models.fedbiot_models import FedBiOTModels
from models.layout import fedbiot_layout
from models.memory_estimate import Setup, depth_memory
from models.wire import state_bytes
from server_app.app import client_setup
from tests.tiny import ADAPTER_REGION as REGION
from tests.tiny import tiny, tiny_fedbiot_models


@pytest.fixture
def models() -> FedBiOTModels:
    return tiny_fedbiot_models()


def test_each_client_gets_the_deepest_depth_that_fits_its_budget() -> None:
    measured = {2: 1.0, 4: 2.0, 6: 3.0}
    budgets = {10: 1.0, 11: 2.5, 12: 3.0, 13: 64.0}
    assert choose_depths(budgets, measured) == {10: 2, 11: 4, 12: 6, 13: 6}
    with pytest.raises(MemoryBudgetError) as error:
        choose_depths({7: 0.9}, measured)
    message = str(error.value)
    assert "client 7" in message and "0.9 GB" in message and "1 GB" in message
    assert "depth 2" in message


def test_depth_table_parsing() -> None:
    assert parse_depth_table("2,4,6", adapter_layers=6) == (2, 4, 6)
    assert parse_depth_table(" 1, 3", adapter_layers=6, num_blocks=8) == (1, 3)
    for text, reason in [
        ("2,x", "integers"),
        ("", "integers"),
        ("0,2", ">= 1"),
        ("4,2", "increasing"),
        ("2,2", "increasing"),
        ("2,8", "exceeds the adapter region"),
    ]:
        with pytest.raises(ValueError, match=reason):
            parse_depth_table(text, adapter_layers=6)
    with pytest.raises(ValueError, match="exceeds the model's 4 blocks"):
        parse_depth_table("2", adapter_layers=6, num_blocks=4)


def test_budget_map_parsing() -> None:
    assert parse_budget_map("0:2.0, 1:4,2:8.5") == {0: 2.0, 1: 4.0, 2: 8.5}
    assert parse_budget_map("") == {}
    for text, reason in [
        ("0=2", "entry '0=2' must be <partition>:<GB>"),
        ("a:2", "entry 'a:2' must be"),
        ("0:abc", "entry '0:abc': 'abc' is not a number"),
        ("0:-1", "must be a positive"),
        ("0:inf", "must be a positive"),
        ("0:1,0:2", "partition 0 is given twice"),
    ]:
        with pytest.raises(MemoryBudgetError, match=f"run-config memory-budgets.*{reason}"):
            parse_budget_map(text)


def test_a_node_budget_comes_from_its_node_config_or_its_partition() -> None:
    budgets = {0: 2.0, 1: 4.0}
    assert node_budget_gb({"memory-budget-gb": 8, "partition-id": 0}, budgets) == 8.0
    assert node_budget_gb({"partition-id": 1}, budgets) == 4.0
    with pytest.raises(MemoryBudgetError, match="node config memory-budget-gb: 'lots'"):
        node_budget_gb({"memory-budget-gb": "lots"}, budgets)
    with pytest.raises(MemoryBudgetError, match="memory-budgets an entry for partition 5"):
        node_budget_gb({"partition-id": 5}, budgets)


def test_the_cpu_tracker_counts_backward_and_the_optimizer_step() -> None:
    linear = torch.nn.Linear(256, 256, bias=False)
    weight_bytes = 256 * 256 * 4

    def step() -> None:
        optimizer = torch.optim.AdamW(linear.parameters(), lr=1e-3)
        linear(torch.randn(4, 256)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    once = _peak_extra_bytes(step, torch.device("cpu"))
    assert once >= 3 * weight_bytes  # gradient + AdamW's two moments
    # Freed storages are uncounted: two steps in a row peak no higher than one.
    assert _peak_extra_bytes(lambda: (step(), step()), torch.device("cpu")) == once


def test_measured_training_memory_grows_with_depth(models: FedBiOTModels) -> None:
    lora = models.compressed
    before = models.adapter_state()
    rng = torch.get_rng_state()

    measured = measure_training_memory(lora, REGION, (2, 4, 6), batch_size=2, seq_length=32)

    assert list(measured) == [2, 4, 6]
    assert measured[2] < measured[4] < measured[6]
    weights = module_bytes(lora.peft)
    for depth, gb in measured.items():
        trained = state_bytes(lora.state(REGION[-depth:]))
        # A real step holds the weights, plus the LoRA's gradients and AdamW moments.
        assert gb * GB >= weights + 3 * trained
    after = models.adapter_state()
    assert all(torch.equal(before[k], after[k]) for k in before)  # LoRA restored
    assert torch.equal(torch.get_rng_state(), rng)
    with pytest.raises(ValueError, match=r"outside 1\.\.6"):
        measure_training_memory(lora, REGION, (7,), batch_size=1, seq_length=16)


def _tiny_setup(**overrides: object) -> Setup:
    """The setting of ``tiny_fedbiot_models`` (LoRA r=4, region of 6 blocks)."""
    fields = {"adapter_layers": len(REGION), "drop_rate": 0.5, "batch": 4, "seq": 64, "lora_r": 4}
    return Setup("tiny-llama", **fields | overrides)


def test_estimated_depth_memory_matches_a_measured_client_step(models: FedBiOTModels) -> None:
    lora = models.compressed  # LoRA on all its blocks, float32 weights: a client's model
    config = models.full.peft.get_base_model().config
    depths = (1, 6)
    estimated = depth_memory(_tiny_setup(), config, models.layout, depths, prox=True)
    measured = measure_training_memory(lora, REGION, depths, 4, 64, prox_epsilon=0.01)
    weights = module_bytes(lora.peft)
    assert estimated[1]["total"] < estimated[6]["total"]
    for depth in depths:
        row = estimated[depth]
        assert 0.8 <= row["total"] / (measured[depth] * GB) <= 1.2, (depth, row, measured)
        extra = measured[depth] * GB - weights  # the step alone, without the weights
        assert 0.8 <= row["step_extra"] / extra <= 1.2, (depth, row["step_extra"], extra)
    with pytest.raises(ValueError, match=r"outside 1\.\.6"):
        depth_memory(_tiny_setup(), config, models.layout, (7,))


def _frozen_counts() -> tuple[int, int]:
    """(the blocks' linear weights, every other parameter) of the tiny client's model,
    counted on the loaded model, tied parameters once."""
    model, _ = tiny("tiny-llama")
    layout = fedbiot_layout(len(get_blocks(model)), len(REGION), 0.5)
    client = extract_blocks(model, layout.kept_blocks)
    total = sum(p.numel() for p in {id(p): p for p in client.parameters()}.values())
    linear = sum(
        m.weight.numel()
        for b in get_blocks(client)
        for m in b.modules()
        if isinstance(m, nn.Linear)
    )
    return linear, total - linear


def test_half_precision_and_4bit_clients_need_less_than_float32(models: FedBiOTModels) -> None:
    config = models.full.peft.get_base_model().config
    linear, other = _frozen_counts()
    rows = {
        name: depth_memory(_tiny_setup(dtype=dtype, bits=bits), config, models.layout, (2,))[2]
        for name, dtype, bits in [
            ("fp32", "float32", 32),
            ("bf16", "bfloat16", 16),
            ("nf4", "bfloat16", 4),
        ]
    }
    assert rows["fp32"]["frozen_weights"] == 4 * (linear + other)
    assert rows["bf16"]["frozen_weights"] == 2 * (linear + other)
    # NF4: 4 bits a weight, one 8-bit absmax per 64 weights and one fp32 constant per 256
    # absmaxes (double quantization); embeddings and norms stay in bfloat16.
    nf4 = linear * (0.5 + 1 / 64 + 4 / (64 * 256)) + 2 * other
    assert rows["nf4"]["frozen_weights"] == pytest.approx(nf4, rel=1e-12)
    assert rows["nf4"]["total"] < rows["bf16"]["total"] < rows["fp32"]["total"]


def test_the_depth_table_is_estimated_for_the_run_configs_client_setting() -> None:
    base = {"device": "cpu", "batch_size": 3, "seq_length": 40, "lora_r": 4}
    setup = client_setup(RunConfig(dtype="bfloat16", gradient_checkpointing=True, **base))
    assert (setup.dtype, setup.bits, setup.checkpointing) == ("bfloat16", 16, True)
    assert (setup.batch, setup.seq, setup.lora_r) == (3, 40, 4)
    # A quantized client computes in bfloat16 when its dtype is float32.
    setup = client_setup(RunConfig(dtype="float32", quantization="4bit", **base))
    assert (setup.dtype, setup.bits) == ("bfloat16", 4)
    assert client_setup(RunConfig(dtype="auto", **base)).dtype == "float32"  # auto on a CPU
