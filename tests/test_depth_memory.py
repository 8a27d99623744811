"""Adapter depth from a node's memory budget: the depth table, budgets, measured memory."""

from __future__ import annotations

import pytest
import torch

from federation.step_memory import _peak_extra_bytes, measure_training_memory, module_bytes
from models.depth_memory import (
    GB,
    MemoryBudgetError,
    choose_depths,
    node_budget_gb,
    parse_budget_map,
    parse_depth_table,
)
from models.fedbiot_models import FedBiOTModels
from models.wire import state_bytes
from tests.tiny import ADAPTER_REGION as REGION
from tests.tiny import tiny_fedbiot_models


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
