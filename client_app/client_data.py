"""A client's own data: its partition of the task, split into train and held-out parts.

The single-client baselines (central, offsite-tuning) hold the union of all partitions:
partition 0 of 1. A SuperNode whose node config names a ``data-file`` (its own instruction
data: a file, a folder or a hub id, read with the run's ``split`` and ``*-column`` keys: the
realistic deployment) trains on that instead of a partition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from transformers import PreTrainedTokenizerBase

from federation.methods import method_plan
from federation.run_config import RunConfig
from task_data import load_records, partition_records, train_test_split
from task_data.formatting import lazy_tokenized_records
from task_data.validation import validation_split


@dataclass(frozen=True)
class ClientData:
    """Train and held-out examples of one partition, each tokenized when first used."""

    train: Sequence[dict]
    test: Sequence[dict]


@lru_cache(maxsize=4)
def _client_data(
    config: RunConfig, partition_id: int, tokenizer: PreTrainedTokenizerBase, data_file: str
) -> ClientData:
    if data_file:
        key = "node config data-file"
        part = load_records(data_file, config.split, columns=config.columns, key=key)
    else:
        records = config.task_records()
        if config.resolved_eval_split == "validation":  # the server's held-out texts
            records = validation_split(records, config.eval_examples)[0]
        part = partition_records(
            records,
            num_partitions=1 if method_plan(config).single_client else config.num_partitions,
            partition_id=partition_id,
            partitioner=config.partitioner,
            seed=config.seed,
            alpha=config.dirichlet_alpha,
        )
    train, test = train_test_split(part, config.test_fraction, config.seed)
    return ClientData(
        train=lazy_tokenized_records(tokenizer, train, config.seq_length),
        test=lazy_tokenized_records(
            tokenizer, test[: config.client_eval_examples], config.seq_length
        ),
    )


def client_data(
    config: RunConfig,
    partition_id: int,
    tokenizer: PreTrainedTokenizerBase,
    data_file: str = "",
) -> ClientData:
    """Memoized per process: simulated clients are called once per round. ``config``
    carries the node's own ``num-partitions`` and ``partition_id`` is in range
    (``client_app.node.node_partition``)."""
    if data_file:
        return _client_data(config, partition_id, tokenizer, data_file)
    if method_plan(config).single_client:
        partition_id = 0
    return _client_data(config, partition_id, tokenizer, "")
