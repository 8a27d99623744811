"""Data handling: shipped data sets and what `datasets` loads, chat formatting with
response-only labels, partitioning, and preference pairs for DPO."""

from task_data.formatting import (
    IGNORE_INDEX,
    batch_iterator,
    collate,
    tokenize_record,
    tokenize_records,
)
from task_data.partition import PARTITIONERS, partition_records, train_test_split
from task_data.preferences import (
    HH_RLHF,
    PreferencePair,
    collate_pairs,
    lazy_tokenized_pairs,
    load_hh_rlhf,
    load_preference_file,
    load_preferences,
    pair_batch_iterator,
    parse_hh_dialogue,
    split_preferences,
    tokenize_pair,
    tokenize_pairs,
)
from task_data.sources import TASKS, USUAL_COLUMNS, Columns, DataError, load_records

__all__ = [
    "HH_RLHF",
    "IGNORE_INDEX",
    "PARTITIONERS",
    "TASKS",
    "USUAL_COLUMNS",
    "Columns",
    "DataError",
    "PreferencePair",
    "batch_iterator",
    "collate",
    "collate_pairs",
    "lazy_tokenized_pairs",
    "load_hh_rlhf",
    "load_preference_file",
    "load_preferences",
    "load_records",
    "pair_batch_iterator",
    "parse_hh_dialogue",
    "partition_records",
    "split_preferences",
    "tokenize_pair",
    "tokenize_pairs",
    "tokenize_record",
    "tokenize_records",
    "train_test_split",
]
