"""Layer layouts: FedBiOT, FedOT/offsite-tuning and whole-model LoRA; each method's."""

import pytest

from federation.methods import method_plan
from federation.run_config import RunConfig
from models.layout import fedbiot_layout, fedot_layout, full_layout, uniform_keep


@pytest.mark.parametrize(
    ("beta", "s", "expected"),
    [(0.2, 2, 24), (0.2, 4, 22), (0.5, 2, 15), (0.5, 4, 14)],
)
def test_table5_counts_for_32_blocks(beta: float, s: int, expected: int) -> None:
    layout = fedbiot_layout(32, s, beta)
    assert len(layout.emulator_blocks) == expected
    assert layout.adapter_blocks == tuple(range(32 - s, 32))
    # First and last block of E* are kept; indices are strictly increasing.
    assert layout.emulator_blocks[0] == 0
    assert layout.emulator_blocks[-1] == 32 - s - 1
    assert list(layout.emulator_blocks) == sorted(set(layout.emulator_blocks))


def test_indices_follow_the_stride_formula() -> None:
    layout = fedbiot_layout(30, 2, 0.5)  # SmolLM2-135M: 28 blocks below the adapter, keep 14
    stride = 27 / 13
    assert layout.emulator_blocks == tuple(int(j * stride) for j in range(14))
    assert set(layout.dropped_blocks) == set(range(28)) - set(layout.emulator_blocks)
    assert layout.kept_blocks == (*layout.emulator_blocks, 28, 29)


def test_no_drop_keeps_every_block() -> None:
    layout = fedbiot_layout(8, 3, 0.0)
    assert layout.emulator_blocks == tuple(range(5))
    assert layout.dropped_blocks == ()


def test_adapter_of_all_but_one_block() -> None:
    layout = fedbiot_layout(8, 7, 0.0)
    assert layout.emulator_blocks == (0,)
    assert layout.full_emulator_blocks == (0,)


def test_decimal_drop_rates_are_exact() -> None:
    # (1 - 0.9) * 10 is 0.999... in floating point; the layout must still keep one block.
    assert len(fedbiot_layout(12, 2, 0.9).emulator_blocks) == 1
    assert uniform_keep(10, 1) == (0,)


@pytest.mark.parametrize(
    ("n", "s", "beta", "message"),
    [
        (8, 0, 0.5, "adapter-layers=0"),
        (8, 8, 0.5, "adapter-layers=8"),
        (8, 2, 1.0, "drop-rate=1.0"),
        (8, 2, -0.1, "drop-rate=-0.1"),
        (1, 1, 0.0, "at least 2"),
        (12, 2, 0.95, "keeps no emulator block"),
    ],
)
def test_invalid_values_are_rejected(n: int, s: int, beta: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fedbiot_layout(n, s, beta)


def test_fedot_layout_sandwiches_a_uniformly_dropped_middle() -> None:
    layout = fedot_layout(8, drop_rate=0.5)
    assert layout.adapter_blocks == (0, 1, 6, 7)
    assert layout.emulator_blocks == (2, 5)  # 2 of the 4 middle blocks, first and last kept
    assert layout.dropped_blocks == (3, 4)
    assert layout.kept_blocks == (0, 1, 2, 5, 6, 7)
    assert layout.distill_tap == 6  # the emulator's output is the input of block 6
    big = fedot_layout(32, drop_rate=0.2)
    assert len(big.emulator_blocks) == 22 and big.emulator_blocks[0] == 2
    assert big.emulator_blocks[-1] == 29


def test_fedot_layout_rejects_models_too_shallow_for_four_adapter_blocks() -> None:
    with pytest.raises(ValueError, match="FedOT needs more than 4"):
        fedot_layout(4, drop_rate=0.0)


def test_full_layout_makes_every_block_adapter() -> None:
    layout = full_layout(6)
    assert layout.adapter_blocks == tuple(range(6))
    assert layout.emulator_blocks == () and layout.dropped_blocks == ()


@pytest.mark.parametrize(
    ("method", "adapter", "emulator"),
    [
        ("fedbiot", (6, 7), (0, 2, 5)),
        ("fedot", (0, 1, 6, 7), (2, 5)),
        ("offsite", (0, 1, 6, 7), (2, 5)),
        ("fedit", tuple(range(8)), ()),
        ("local", tuple(range(8)), ()),
        ("central", tuple(range(8)), ()),
    ],
)
def test_each_method_has_its_layout(method: str, adapter: tuple, emulator: tuple) -> None:
    config = RunConfig(method=method, adapter_layers=2, drop_rate=0.5)
    layout = method_plan(config).layout(config, 8)
    assert layout.adapter_blocks == adapter
    assert layout.emulator_blocks == emulator
