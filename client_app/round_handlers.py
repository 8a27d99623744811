"""The ClientApp's train and evaluate handlers: local SFT or DPO steps on the trained LoRA,
and the held-out loss of the node's model (``client_app/app.py`` registers them).

Each round a node receives the LoRA it trains (and, with an emulator, the emulator LoRA) and
returns only the trained LoRA and its example count. With SCAFFOLD it also receives the
server control variate, keeps its own in the node state and returns the change of its own.
In a DPO round (``stage`` in the round's config) it trains the same LoRA with DPO on its
preference pairs, or, without any, skips the round and says so.
"""

from __future__ import annotations

import resource

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from client_app.client_data import ClientData
from client_app.client_preferences import client_preferences
from client_app.dpo_training import train_dpo
from client_app.model_cache import ClientModel
from client_app.node import load_node
from federation.local_training import client_control_update, response_loss, train_lora
from federation.messages import DELTA_C, DPO_REFERENCE, SERVER_C, depth_blocks
from federation.methods import method_plan
from federation.run_config import RunConfig
from models.wire import from_record, to_record
from task_data import batch_iterator, collate, pair_batch_iterator

CLIENT_C = "scaffold-c-i"
CLIENT_C_UPDATES = "scaffold-c-i-updates"


def _prepare(msg: Message, context: Context) -> tuple[RunConfig, ClientModel, int, ClientData]:
    """The node's model with this round's LoRA loaded, its config and data."""
    config, model, partition_id, data = load_node(msg, context)
    state = from_record(msg.content["arrays"])
    if "emulator" in msg.content:
        state.update(from_record(msg.content["emulator"]))
    model.lora.load_state(state)
    return config, model, partition_id, data


def _scaffold_correction(
    msg: Message, context: Context, received: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
    """SCAFFOLD's ``(c, c_i)``; ``c_i`` lives in the node state across rounds."""
    if SERVER_C not in msg.content:
        return None
    c = from_record(msg.content[SERVER_C])
    if CLIENT_C in context.state:
        c_i = from_record(context.state[CLIENT_C])
    else:
        c_i = {k: torch.zeros_like(v) for k, v in received.items()}
    return c, c_i


def _skip_reply(msg: Message, partition_id: int) -> Message:
    """A DPO round on a node without preference pairs: no update, and the metrics say so."""
    metrics = MetricRecord({"dpo_skipped": 1, "partition-id": partition_id, "num-examples": 0})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def _common_metrics(model: ClientModel, partition_id: int, partitions: int) -> dict[str, float]:
    return {
        "partition-id": partition_id,
        "num-partitions": partitions,
        "client_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "client_quantized_bits": {"8bit": 8, "4bit": 4}.get(
            model.quantization, torch.finfo(model.lora.peft.get_base_model().dtype).bits
        ),
    }


def train_round(msg: Message, context: Context) -> Message:
    """K local steps (SFT, or DPO in a DPO round) on the trained LoRA; reply with it only."""
    config, model, partition_id, data = _prepare(msg, context)
    plan = method_plan(config)
    train_config = msg.content["config"]
    server_round = int(train_config["server-round"])
    learning_rate = float(train_config.get("learning-rate", config.learning_rate))
    seed = config.seed + 1009 * server_round + partition_id
    torch.manual_seed(seed)
    pad = model.tokenizer.pad_token_id
    # FedBiAlign: a node trains the top ``adapter-depth`` blocks its memory allows.
    adapter = depth_blocks(train_config, model.layout.adapter_blocks)
    if str(train_config.get("stage", "sft")) == "dpo":
        preference_file = str(context.node_config.get("preference-file", ""))
        pairs = client_preferences(config, partition_id, model.tokenizer, preference_file)
        if not pairs:
            return _skip_reply(msg, partition_id)
        reference = None
        if config.dpo_reference == "fixed":
            if DPO_REFERENCE not in msg.content:
                raise ValueError(
                    f"run config dpo-reference='fixed' but round {server_round}'s message has "
                    f"no '{DPO_REFERENCE}' record (only FedBiOT-mixin strategies send it)"
                )
            reference = from_record(msg.content[DPO_REFERENCE])
        dpo = train_dpo(
            model.lora,
            adapter,
            pair_batch_iterator(pairs, config.batch_size, seed, pad),
            steps=config.local_steps,
            learning_rate=learning_rate,
            beta=config.dpo_beta,
            weight_decay=config.weight_decay,
            reference_state=reference,
            accum_steps=config.grad_accum_steps,
        )
        metrics = MetricRecord(
            {
                "dpo_loss": dpo.loss,
                "dpo_reward_accuracy": dpo.accuracy,
                "dpo_reward_margin": dpo.margin,
                "dpo_skipped": 0,
                "train_tokens": dpo.tokens,
                "train_seconds": dpo.seconds,
                **_common_metrics(model, partition_id, config.num_partitions),
                "num-examples": len(pairs),
            }
        )
        content = RecordDict({"arrays": to_record(model.lora.state(adapter)), "metrics": metrics})
        return Message(content, reply_to=msg)
    received = model.lora.state(adapter)
    scaffold = _scaffold_correction(msg, context, received)
    result = train_lora(
        model.lora,
        adapter,
        batch_iterator(data.train, config.batch_size, seed, pad),
        steps=config.local_steps,
        learning_rate=learning_rate,
        prox_epsilon=config.prox_epsilon if plan.uses_prox_epsilon else 0.0,
        weight_decay=config.weight_decay,
        proximal_mu=float(train_config.get("proximal-mu", 0.0)),
        correction=None
        if scaffold is None
        else {k: scaffold[0][k] - scaffold[1][k] for k in received},
        accum_steps=config.grad_accum_steps,
    )
    metrics = MetricRecord(
        {
            "train_loss": result.loss,
            "prox_loss": result.prox,
            "train_tokens": result.tokens,
            "train_seconds": result.seconds,
            **_common_metrics(model, partition_id, config.num_partitions),
            "num-examples": len(data.train),
        }
    )
    trained = model.lora.state(adapter)
    content = RecordDict({"arrays": to_record(trained), "metrics": metrics})
    if scaffold is not None:
        c_new, delta = client_control_update(
            scaffold[0], scaffold[1], received, trained, config.local_steps, learning_rate
        )
        context.state[CLIENT_C] = to_record(c_new)
        updates = int(context.state.get(CLIENT_C_UPDATES, ConfigRecord({"n": 0}))["n"]) + 1
        context.state[CLIENT_C_UPDATES] = ConfigRecord({"n": updates})
        metrics["scaffold_ci_updates"] = updates  # proves c_i survives between rounds
        content[DELTA_C] = to_record(delta)
    return Message(content, reply_to=msg)


def evaluate_round(msg: Message, context: Context) -> Message:
    """Response-token loss of the node's model (AdapEmu with an emulator) on its held-out
    split (the union's, for the single-client baselines)."""
    config, model, _, data = _prepare(msg, context)
    pad = model.tokenizer.pad_token_id
    batches = [
        collate(data.test[i : i + config.batch_size], pad)
        for i in range(0, len(data.test), config.batch_size)
    ]
    loss = response_loss(model.lora, batches)
    metrics = MetricRecord({"eval_loss": loss, "num-examples": len(data.test)})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
