"""Data handling: shipped data sets, chat formatting with response-only labels, partitioning."""

from task_data.formatting import (
    IGNORE_INDEX,
    batch_iterator,
    collate,
    tokenize_record,
    tokenize_records,
)
from task_data.partition import PARTITIONERS, partition_records, train_test_split
from task_data.sources import TASKS, DataError, load_records

__all__ = [
    "IGNORE_INDEX",
    "PARTITIONERS",
    "TASKS",
    "DataError",
    "batch_iterator",
    "collate",
    "load_records",
    "partition_records",
    "tokenize_record",
    "tokenize_records",
    "train_test_split",
]
