"""The FedBiOT ClientApp: trains the adapter LoRA on the node's own data.

A node receives the compressed frozen weights the first time it is sampled (and stores them
in its cache), then each round the adapter and emulator LoRA; it returns only the adapter
LoRA and its example count.
"""

from __future__ import annotations

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client_app.client_data import client_data
from client_app.local_training import response_loss, train_lora
from client_app.model_cache import ClientModel, load_client_model, node_cache_dir, store_package
from models.lora import LoraSpec
from models.wire import from_record, to_record
from server_app.run_config import RunConfig
from task_data import batch_iterator, collate

app = ClientApp()


def _prepare(msg: Message, context: Context) -> tuple[RunConfig, ClientModel, int]:
    """Parse the config, get the compressed model and load this round's LoRA into it."""
    config = RunConfig.from_flower(context.run_config)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    root = str(context.node_config.get("cache-dir", "") or config.cache_dir)
    cache = node_cache_dir(root, context.node_id)
    content = msg.content
    if "base" in content:
        store_package(cache, content["base"], content["model-package"])
    spec = LoraSpec(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout)
    model = load_client_model(cache, str(content["config"]["model-digest"]), spec)
    model.lora.peft.to(config.torch_device())
    model.lora.load_state({**from_record(content["arrays"]), **from_record(content["emulator"])})
    partition_id = int(context.node_config.get("partition-id", 0))
    return config, model, partition_id


@app.train()
def train(msg: Message, context: Context) -> Message:
    """K local steps on the adapter LoRA; reply with the adapter LoRA only."""
    config, model, partition_id = _prepare(msg, context)
    data = client_data(config, partition_id, model.tokenizer)
    server_round = int(msg.content["config"]["server-round"])
    seed = config.seed + 1009 * server_round + partition_id
    torch.manual_seed(seed)
    batches = batch_iterator(
        list(data.train), config.batch_size, seed, model.tokenizer.pad_token_id
    )
    adapter = model.layout.adapter_blocks
    result = train_lora(
        model.lora,
        adapter,
        batches,
        steps=config.local_steps,
        learning_rate=config.learning_rate,
        prox_epsilon=config.prox_epsilon,
        weight_decay=config.weight_decay,
    )
    metrics = MetricRecord(
        {
            "train_loss": result.loss,
            "prox_loss": result.prox,
            "train_tokens": result.tokens,
            "train_seconds": result.seconds,
            "num-examples": len(data.train),
        }
    )
    arrays = to_record(model.lora.state(adapter))
    return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Response-token loss of AdapEmu on the node's held-out split."""
    config, model, partition_id = _prepare(msg, context)
    data = client_data(config, partition_id, model.tokenizer)
    pad = model.tokenizer.pad_token_id
    batches = [
        collate(list(data.test[i : i + config.batch_size]), pad)
        for i in range(0, len(data.test), config.batch_size)
    ]
    loss = response_loss(model.lora, batches)
    metrics = MetricRecord({"eval_loss": loss, "num-examples": len(data.test)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
