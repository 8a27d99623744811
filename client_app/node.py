"""What every client message handler starts with: the run config, this node's compressed
model (stored from the message the first time the node is served) and its data."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from flwr.app import Context, Message

from client_app.client_data import ClientData, client_data
from client_app.model_cache import CacheError, ClientModel, load_client_model
from client_app.model_offer import receive_weights
from client_app.weight_store import store_place
from federation.run_config import RunConfig
from models.lora import LoraSpec
from models.precision import resolve_dtype, set_gradient_checkpointing
from models.quantization import check_mode


def node_partition(
    node_config: Mapping[str, Any], node_id: int, run_partitions: int
) -> tuple[int, int]:
    """This node's ``(partition-id, num-partitions)`` from its node config.

    Flower's simulation engine puts both in every node's config (``num-partitions`` is the
    number of SuperNodes), and a deployed SuperNode gets them with ``--node-config``: they
    win over the run config's ``num-partitions``, which only stands in where the node config
    has none, so a federation of any size trains all of its data. A node with neither a
    partition nor its own ``data-file`` is refused rather than silently given partition 0;
    a ``data-file`` node without a partition id counts as partition 0 (seeds, metrics)."""
    partitions = int(node_config.get("num-partitions", run_partitions))
    if "partition-id" not in node_config:
        if node_config.get("data-file"):
            return 0, partitions
        raise ValueError(
            f"node {node_id}: its node config has neither partition-id nor data-file; start "
            'the SuperNode with --node-config "partition-id=I num-partitions=N" or '
            "\"data-file='/path/records.jsonl'\""
        )
    partition_id = int(node_config["partition-id"])
    if not 0 <= partition_id < partitions:
        source = "node config" if "num-partitions" in node_config else "run-config"
        raise ValueError(
            f"node {node_id}: partition-id={partition_id} but {source} num-partitions="
            f"{partitions}; start as many SuperNodes as partitions "
            "(e.g. --federation-config num-supernodes=N)"
        )
    return partition_id, partitions


def load_node(msg: Message, context: Context) -> tuple[RunConfig, ClientModel, int, ClientData]:
    """Config (with the node's own ``num-partitions``), the node's cached model on the run's
    device, partition id and data."""
    config = RunConfig.from_flower(context.run_config)
    partition_id, partitions = node_partition(
        context.node_config, context.node_id, config.num_partitions
    )
    config = dataclasses.replace(config, num_partitions=partitions)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    place = store_place(context.node_config, config.cache_dir, context.node_id)
    spec = LoraSpec(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout)
    quantization = check_mode(str(context.node_config.get("quantization", config.quantization)))
    where = "node config dtype" if "dtype" in context.node_config else "run-config dtype"
    name = str(context.node_config.get("dtype", config.dtype))
    dtype = resolve_dtype(name, config.torch_device(), f"node {context.node_id}: {where}")
    try:
        digest = receive_weights(msg, context, config, place)
        model = load_client_model(place.root, digest, spec, quantization, dtype)
    except CacheError as err:  # the reply fails; the server names the node in its log too
        raise CacheError(f"node {context.node_id}: {err}") from err
    if model.quantization == "none":  # bitsandbytes placed a quantized model already
        model.lora.peft.to(config.torch_device())
    set_gradient_checkpointing(model.lora.peft.get_base_model(), config.gradient_checkpointing)
    data_file = str(context.node_config.get("data-file", ""))
    data = client_data(config, partition_id, model.tokenizer, data_file)
    return config, model, partition_id, data
