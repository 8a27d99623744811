"""What every method's ServerApp does before its first round: seed, check the task data,
and (for emulated methods) stream the public set for distillation."""

from __future__ import annotations

import random

import numpy as np
import torch

from server_app.methods import MethodPlan
from server_app.run_config import ConfigError, RunConfig
from task_data import batch_iterator, load_records, partition_records, tokenize_records


def seed_everything(seed: int) -> None:
    """Python's RNG also decides Flower's node sampling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def public_batches(config: RunConfig, tokenizer) -> object:
    """Endless batches of the public (server) data set, for distillation."""
    records = list(load_records(config.public_data, "train", data_dir=config.data_dir or None))
    random.Random(config.seed).shuffle(records)
    examples = tokenize_records(tokenizer, records[: config.public_examples], config.seq_length)
    return batch_iterator(examples, config.batch_size, config.seed, tokenizer.pad_token_id)


def check_task_data(config: RunConfig, plan: MethodPlan) -> None:
    """Fail before any model is loaded if the task's data cannot be split as configured."""
    records = load_records(config.task, "train", data_dir=config.data_dir or None)
    try:
        partition_records(
            records,
            num_partitions=1 if plan.single_client else config.num_partitions,
            partition_id=0,
            partitioner=config.partitioner,
            seed=config.seed,
            alpha=config.dirichlet_alpha,
        )
    except ValueError as error:
        raise ConfigError(f"run-config task={config.task!r}: {error}") from None
