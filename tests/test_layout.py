"""FedBiOT layer extraction: block counts and indices."""

import pytest

from models.layout import fedbiot_layout, uniform_keep


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
