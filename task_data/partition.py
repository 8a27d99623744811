"""Split records among clients with flwr-datasets partitioners, and hold out a test part.

The partitioners run on the records ``task_data.sources`` has already loaded and checked, not
through ``FederatedDataset``: that class wraps ``load_dataset`` only, while tasks here also
come from shipped sets and node files whose bad records are named by file and line before
any partition is drawn; one path for every source keeps partitions identical across them.
"""

from __future__ import annotations

import random

from datasets import Dataset

from task_data.deferred_plots import defer_visualization

defer_visualization()  # before flwr_datasets' first import, which would load its plotting stack

from flwr_datasets.partitioner import (  # noqa: E402 - after the deferral above
    DirichletPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
)
from flwr_datasets.partitioner.partitioner import Partitioner  # noqa: E402

PARTITIONERS = ("iid", "dirichlet", "natural")


def _make_partitioner(
    kind: str, num_partitions: int, seed: int, alpha: float, key: str
) -> Partitioner:
    if kind == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if kind == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=key,
            alpha=alpha,
            seed=seed,
            min_partition_size=1,
        )
    return NaturalIdPartitioner(partition_by=key)


def _partition_indices(
    records: list[dict], num_partitions: int, kind: str, seed: int, alpha: float, key: str
) -> list[list[int]]:
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)  # IidPartitioner cuts contiguous shards
    table: dict[str, list] = {"row": order}
    if kind != "iid":
        table[key] = [str(records[i][key]) for i in order]
    partitioner = _make_partitioner(kind, num_partitions, seed, alpha, key)
    partitioner.dataset = Dataset.from_dict(table)
    if kind == "natural" and partitioner.num_partitions != num_partitions:
        raise ValueError(
            f"partitioner='natural' makes one partition per distinct {key!r} "
            f"({partitioner.num_partitions}), but num-partitions={num_partitions}"
        )
    return [list(partitioner.load_partition(i)["row"]) for i in range(num_partitions)]


def partition_records(
    records: list[dict],
    num_partitions: int,
    partition_id: int,
    partitioner: str = "iid",
    seed: int = 0,
    alpha: float = 0.5,
    key: str = "label",
) -> list[dict]:
    """Records of partition ``partition_id`` out of ``num_partitions``.

    ``iid``: shuffled equal shards; ``dirichlet``: label proportions drawn from Dir(alpha)
    over ``key``; ``natural``: one partition per distinct value of ``key``.
    """
    if partitioner not in PARTITIONERS:
        raise ValueError(f"partitioner={partitioner!r} must be one of {PARTITIONERS}")
    if not 1 <= num_partitions <= len(records):
        raise ValueError(
            f"num-partitions={num_partitions} must be between 1 and the {len(records)} "
            "examples of the data set"
        )
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id={partition_id} must be in [0, {num_partitions})")
    if partitioner != "iid" and any(key not in r for r in records):
        raise ValueError(f"partitioner={partitioner!r} needs the field {key!r} in every record")
    indices = _partition_indices(records, num_partitions, partitioner, seed, alpha, key)
    return [records[i] for i in indices[partition_id]]


def train_test_split(
    records: list[dict], test_fraction: float, seed: int
) -> tuple[list[dict], list[dict]]:
    """Deterministic split; the test part has at least one record when possible."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_test = max(1, round(test_fraction * len(records))) if len(records) > 1 else 0
    test = [records[i] for i in order[:n_test]]
    train = [records[i] for i in order[n_test:]]
    return train, test
