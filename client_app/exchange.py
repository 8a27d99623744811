"""ClientApp handlers of KD-FedLLM (``train.kdfed``) and split learning (``train.split``).

``kdfed_train``: one message per round. The client's own LoRA lives in its node state and
never travels; it trains on the node's data with the KL term towards the soft labels that
came with the message (none in round 1), then answers with its soft labels on the public
set (``federation/kd_public``).

``split_step``: one message per training step. A ClientApp may run in a fresh process for
each message, so nothing can wait in memory between two steps: the client LoRA and its
AdamW moments are kept in the node state, and the autograd graph is rebuilt (activation
recomputation, ``ClientPart.recompute_backward``) when the server's gradient for the
previous step's activations arrives. Message ``s`` of a round of K steps carries the
gradient of step ``s - 1`` (from ``s = 1``) and asks for the activations of step ``s``
(until ``s = K``, which asks for the client LoRA instead). Step ``s``'s batch and dropout
masks are functions of (seed, round, partition, s), so the recomputation sees what the
first forward saw.
"""

from __future__ import annotations

import math
import time
from itertools import islice

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from torch import nn

from client_app.node import load_node
from federation.kd_public import (
    SOFT_LABELS,
    kd_steps,
    payload_record,
    public_set,
    record_payload,
    soft_labels,
    to_targets,
)
from federation.messages import ACTIVATIONS, GRADIENT
from models.lora import LoraModel
from models.split_model import ClientPart, pack_forward, unpack_activations, unwrap
from models.wire import from_record, to_record
from task_data import batch_iterator

KD_LORA = "kdfed-lora"
SPLIT_LORA = "split-lora"
SPLIT_ADAM = "split-adam"
SPLIT_ADAM_STEP = "split-adam-step"


def initial_lora(lora: LoraModel, seed: int) -> dict[str, torch.Tensor]:
    """peft's initialisation (Kaiming-uniform A, zero B: the base model), but seeded, so a
    client's own LoRA starts the same way in whatever process serves it."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, param in lora.params().items():
        value = torch.zeros(param.shape)
        if name.endswith("lora_A"):
            nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=generator)
        state[name] = value
    return state


def kdfed_train(msg: Message, context: Context) -> Message:
    """Local steps with the KL term, then the soft labels on the public set."""
    config, model, partition_id, data = load_node(msg, context)
    train_config = msg.content["config"]
    server_round = int(train_config["server-round"])
    seed = config.seed + 1009 * server_round + partition_id
    torch.manual_seed(seed)
    if KD_LORA in context.state:
        model.lora.load_state(from_record(context.state[KD_LORA]))
    else:
        model.lora.load_state(initial_lora(model.lora, config.seed + partition_id))
    public = public_set(config, model.tokenizer)
    targets = None
    if SOFT_LABELS in msg.content:
        targets = to_targets(record_payload(msg.content[SOFT_LABELS]))
    optimizer = torch.optim.AdamW(
        model.lora.params().values(),
        lr=float(train_config["learning-rate"]),
        weight_decay=config.weight_decay,
    )
    batches = batch_iterator(data.train, config.batch_size, seed, model.tokenizer.pad_token_id)
    result = kd_steps(
        model.lora,
        optimizer,
        config.local_steps,
        public,
        targets,
        config.kd_temperature,
        config.kd_weight,
        task_batches=batches,
        first_chunk=(server_round - 1) * config.local_steps,
    )
    start = time.perf_counter()
    payload = soft_labels(model.lora.peft, public, config.kd_temperature, config.kd_topk)
    public_seconds = time.perf_counter() - start
    context.state[KD_LORA] = to_record(model.lora.state())
    metrics = MetricRecord(
        {
            "train_loss": result.loss,
            "task_loss": result.task_loss,
            "kd_loss": result.kd_loss,
            "train_seconds": result.seconds,
            "public_seconds": public_seconds,
            "client_seconds": result.seconds + public_seconds,
            "num-examples": len(data.train),
        }
    )
    return Message(
        RecordDict({SOFT_LABELS: payload_record(payload), "metrics": metrics}), reply_to=msg
    )


def _save_adam(optimizer: torch.optim.Optimizer, named: dict, context: Context) -> None:
    """AdamW's moments and step count into the node state (the next message needs them)."""
    moments, step = {}, 0
    for name, param in named.items():
        state = optimizer.state.get(param)
        if state:
            moments[f"{name}.exp_avg"] = state["exp_avg"]
            moments[f"{name}.exp_avg_sq"] = state["exp_avg_sq"]
            step = int(state["step"])
    context.state[SPLIT_ADAM] = to_record(moments)
    context.state[SPLIT_ADAM_STEP] = ConfigRecord({"step": step})


def _restore_adam(optimizer: torch.optim.Optimizer, named: dict, context: Context) -> None:
    moments = from_record(context.state[SPLIT_ADAM])
    step = float(context.state[SPLIT_ADAM_STEP]["step"])
    for name, param in named.items():
        if f"{name}.exp_avg" in moments:
            optimizer.state[param] = {
                "step": torch.tensor(step),
                "exp_avg": moments[f"{name}.exp_avg"].to(param.device),
                "exp_avg_sq": moments[f"{name}.exp_avg_sq"].to(param.device),
            }


def _dropout_seed(seed: int, step: int) -> int:
    """One seed per (client round, step): the first forward and its recomputation agree."""
    return (seed * 1_000_003 + step) % 2**62


def split_step(msg: Message, context: Context) -> Message:
    """Finish the previous step with the server's gradient; send the next activations."""
    config, model, partition_id, data = load_node(msg, context)
    step_config = msg.content["config"]
    server_round, step = int(step_config["server-round"]), int(step_config["step"])
    blocks = model.layout.kept_blocks  # the client's blocks [0, k)
    part = ClientPart(unwrap(model.lora), range(len(blocks)))
    named = model.lora.params(blocks)
    params = model.lora.train_only(blocks)
    fresh = "arrays" in msg.content  # a round starts from the averaged client LoRA
    model.lora.load_state(
        from_record(msg.content["arrays"] if fresh else context.state[SPLIT_LORA])
    )
    optimizer = torch.optim.AdamW(
        params, lr=float(step_config["learning-rate"]), weight_decay=config.weight_decay
    )
    if not fresh:
        _restore_adam(optimizer, named, context)
    seed = config.seed + 1009 * server_round + partition_id

    def batch(index: int) -> dict[str, torch.Tensor]:
        stream = batch_iterator(data.train, config.batch_size, seed, model.tokenizer.pad_token_id)
        return next(islice(stream, index, None))

    model.lora.peft.train()
    start = time.perf_counter()
    if GRADIENT in msg.content:
        gradient = unpack_activations(
            msg.content[GRADIENT]["hidden"].numpy(),
            dict(msg.content[f"{GRADIENT}-meta"]),
            part.device,
            part.dtype,
        )
        part.recompute_backward(batch(step - 1), gradient, seed=_dropout_seed(seed, step - 1))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    content = RecordDict()
    if bool(step_config["final"]):
        content["arrays"] = to_record(model.lora.state(blocks))
    else:
        current = batch(step)
        with torch.no_grad():
            hidden = part.forward(current, seed=_dropout_seed(seed, step))
        arrays, meta = pack_forward(
            hidden, current["attention_mask"], current["labels"], config.split_dtype
        )
        content[ACTIVATIONS] = ArrayRecord({k: Array(v) for k, v in arrays.items()})
        content[f"{ACTIVATIONS}-meta"] = ConfigRecord(meta)
    seconds = time.perf_counter() - start
    model.lora.peft.eval()
    for param in params:
        param.requires_grad_(False)
    context.state[SPLIT_LORA] = to_record(model.lora.state(blocks))
    _save_adam(optimizer, named, context)
    content["metrics"] = MetricRecord({"client_seconds": seconds, "num-examples": len(data.train)})
    return Message(content, reply_to=msg)
