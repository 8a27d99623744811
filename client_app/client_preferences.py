"""A client's preference pairs for DPO rounds.

The preference set (``preference-data``) is split once, with the run's seed, into a
held-out part the server scores (reward accuracy) and a training part
(``federation.preferences.split_shared``) that is partitioned IID across the clients named
by ``preference-clients``. A SuperNode may instead name its own file with node config
``preference-file``. A client with neither has no preference data: it skips DPO rounds
(selective alignment).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from transformers import PreTrainedTokenizerBase

from federation.preferences import split_shared
from federation.run_config import RunConfig
from task_data import lazy_tokenized_pairs, load_preferences, partition_records


def preference_clients(text: str) -> frozenset[int] | None:
    """``all`` (None: every partition) or comma-separated partition ids."""
    if text.strip() == "all":
        return None
    try:
        ids = frozenset(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(
            f"run-config preference-clients={text!r}: use 'all' or partition ids like '0,2'"
        ) from None
    if any(i < 0 for i in ids):
        raise ValueError(f"run-config preference-clients={text!r}: ids must be >= 0")
    return ids


@lru_cache(maxsize=4)
def client_preferences(
    config: RunConfig,
    partition_id: int,
    tokenizer: PreTrainedTokenizerBase,
    preference_file: str = "",
) -> Sequence[dict]:
    """Pairs this client trains DPO on, each tokenized when first used; empty when it has
    none."""
    if preference_file:
        pairs = load_preferences(preference_file, key="node config preference-file")
    else:
        chosen = preference_clients(config.preference_clients)
        if chosen is not None and partition_id not in chosen:
            return []
        train, _ = split_shared(config)
        pairs = partition_records(
            train,
            num_partitions=config.num_partitions,
            partition_id=partition_id,
            partitioner="iid",
            seed=config.seed,
        )
    return lazy_tokenized_pairs(tokenizer, pairs, config.seq_length)
