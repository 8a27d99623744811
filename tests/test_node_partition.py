"""A node's partition comes from its node config (Flower's simulation engine sets
``partition-id`` and ``num-partitions`` on every node); the run config's ``num-partitions``
only stands in where the node config has none, and a node with neither a partition nor its
own data file is refused by name instead of silently training partition 0."""

from __future__ import annotations

import pytest

from client_app.node import node_partition


def test_the_node_config_num_partitions_wins_over_the_run_config() -> None:
    # Two simulated SuperNodes under the default run config (num-partitions=3).
    assert node_partition({"partition-id": 1, "num-partitions": 2}, 11, 3) == (1, 2)


def test_the_run_config_stands_in_where_the_node_config_has_no_num_partitions() -> None:
    assert node_partition({"partition-id": 2}, 11, 3) == (2, 3)


def test_a_node_with_its_own_data_file_needs_no_partition() -> None:
    assert node_partition({"data-file": "/data/mine.jsonl"}, 11, 3) == (0, 3)


def test_a_node_without_partition_or_data_file_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"node 7: its node config has neither partition-id"):
        node_partition({"cache-dir": "/tmp/cache"}, 7, 3)


@pytest.mark.parametrize(
    ("node_config", "named"),
    [
        ({"partition-id": 2, "num-partitions": 2}, "node config num-partitions=2"),
        ({"partition-id": 3}, "run-config num-partitions=3"),
        ({"partition-id": -1}, "run-config num-partitions=3"),
    ],
)
def test_a_partition_out_of_range_names_the_node_and_the_source(
    node_config: dict[str, object], named: str
) -> None:
    with pytest.raises(ValueError, match=rf"node 5: partition-id=-?\d but {named}"):
        node_partition(node_config, 5, 3)
