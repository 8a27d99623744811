"""What every method's ServerApp does before its first round: seed, check the task data,
open the results folder, load the model, record its fields in config.json, and (for
emulated methods) stream the public set for distillation."""

from __future__ import annotations

import random
from logging import INFO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.common.logger import log
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from federation.methods import MethodPlan
from federation.run_config import ConfigError, RunConfig
from models.fedbiot_models import FedBiOTModels
from models.loading import load_model
from models.precision import resolve_dtype
from server_app.results import RunRecorder
from task_data import batch_iterator, load_records, partition_records, tokenize_records


def seed_everything(seed: int) -> None:
    """Python's RNG also decides Flower's node sampling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _public_records(config: RunConfig) -> list[dict]:
    key = "run-config public-data"
    records = load_records(config.public_data, data_dir=config.data_dir or None, key=key)
    random.Random(config.seed).shuffle(records)
    return records


def public_batches(config: RunConfig, tokenizer) -> object:
    """Endless batches of the public (server) data set, for distillation."""
    records = _public_records(config)[: config.public_examples]
    examples = tokenize_records(tokenizer, records, config.seq_length)
    return batch_iterator(examples, config.batch_size, config.seed, tokenizer.pad_token_id)


def public_heldout_records(config: RunConfig, size: int) -> list[dict]:
    """Public records that distillation never reads (those after its ``public-examples``),
    for measuring the emulator's fidelity on text it was not fitted to."""
    return _public_records(config)[config.public_examples : config.public_examples + size]


def check_task_data(config: RunConfig, plan: MethodPlan) -> None:
    """Fail before any model is loaded if the task's data cannot be split as configured."""
    records = config.task_records()
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


def open_run(
    config: RunConfig,
    plan: MethodPlan,
    resume_dir: Path | None = None,
    resumed_round: int | None = None,
) -> tuple[RunRecorder, PreTrainedModel, PreTrainedTokenizerBase]:
    """Threads, seed, data check, the results folder, then the (uncompressed) model."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    seed_everything(config.seed)
    check_task_data(config, plan)
    recorder = RunRecorder(config, resume_dir, resumed_round)
    log(INFO, "Results go to %s", recorder.dir)
    dtype = resolve_dtype(config.dtype, config.torch_device(), "run-config dtype")
    log(INFO, "Frozen weights in %s, LoRA in float32", str(dtype).removeprefix("torch."))
    base, tokenizer = load_model(config.model, dtype)
    return recorder, base, tokenizer


def model_fields(method: str, models: FedBiOTModels) -> dict[str, Any]:
    """The config.json fields every method records about its models."""
    return {
        "method": method,
        "model_digest": models.frozen_digest,
        "compressed_model_bytes": models.frozen.count_bytes(),
        "trainable_adapter_params": sum(t.numel() for t in models.adapter_state().values()),
        "trainable_emulator_params": sum(t.numel() for t in models.emulator_state().values()),
    }
