"""What every client message handler starts with: the run config, this node's compressed
model (stored from the message the first time the node is served) and its data."""

from __future__ import annotations

import torch
from flwr.app import Context, Message

from client_app.client_data import ClientData, client_data
from client_app.model_cache import (
    CacheError,
    ClientModel,
    load_client_model,
    node_cache_dir,
    store_package,
)
from models.lora import LoraSpec
from models.quantization import check_mode
from server_app.run_config import RunConfig


def load_node(msg: Message, context: Context) -> tuple[RunConfig, ClientModel, int, ClientData]:
    """Config, the node's cached model on the run's device, partition id and data."""
    config = RunConfig.from_flower(context.run_config)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    root = str(context.node_config.get("cache-dir", "") or config.cache_dir)
    cache = node_cache_dir(root, context.node_id)
    content = msg.content
    spec = LoraSpec(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout)
    quantization = check_mode(str(context.node_config.get("quantization", config.quantization)))
    try:
        if "base" in content:
            store_package(cache, content["base"], content["model-package"])
        digest = content["config"].get("model-digest")
        model = load_client_model(cache, str(digest), spec, quantization)
    except CacheError as err:  # the reply fails; the server names the node in its log too
        raise CacheError(f"node {context.node_id}: {err}") from err
    if model.quantization == "none":  # bitsandbytes placed a quantized model already
        model.lora.peft.to(config.torch_device())
    partition_id = int(context.node_config.get("partition-id", 0))
    data_file = str(context.node_config.get("data-file", ""))
    data = client_data(config, partition_id, model.tokenizer, data_file)
    return config, model, partition_id, data
