"""KD-FedLLM: clients exchange soft labels on a public set, never parameters.

A round: every sampled client trains its own LoRA (kept in its node state, never sent) on
its private data, aligned by a KL term with the soft labels the server sent last round
(``loss = (1 - kd-weight) * task + kd-weight * KL``), then uploads its soft labels on the
public set (``federation/kd_public``). The server averages them, weighted by the clients'
example counts (``aggregate_soft_labels``), distils the average into the global model
(``kd-distill-steps`` AdamW steps at ``distill-lr``, optimizer state kept across rounds),
evaluates the global model and sends the average back with the next round's message.

Per round a client receives the aggregated soft labels and sends its own; the full frozen
model goes once per node, as for FedIT. ``payload_bytes_up``/``payload_bytes_down`` are the
raw payload sizes (``models.kd_logits.payload_bytes``), ``bytes_up``/``bytes_down`` Flower's
count of the same ArrayRecords (plus NumPy headers and keys).
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from federation.kd_public import (
    SOFT_LABELS,
    kd_steps,
    payload_problem,
    payload_record,
    public_set,
    record_payload,
    to_targets,
)
from federation.run_config import RunConfig
from models.blocks import get_blocks
from models.fedbiot_models import FedBiOTModels
from models.kd_logits import aggregate_soft_labels, payload_bytes
from models.layout import full_layout
from models.lora import LoraSpec
from models.precision import set_gradient_checkpointing
from server_app.exchange_loop import (
    RoundTrip,
    client_means,
    finish_run,
    round_config,
    sample_nodes,
    start_run,
)
from server_app.run_setup import model_fields
from server_app.server_eval import ServerEvaluator
from strategies.shipment import Shipment

MESSAGE_TYPE = "train.kdfed"


def run_kdfed(grid: Grid, config: RunConfig) -> Path:
    """The whole server side of a KD-FedLLM run; returns the results folder."""
    recorder, base, tokenizer = start_run(config)
    layout = full_layout(len(get_blocks(base)))
    spec = LoraSpec(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout)
    models = FedBiOTModels(base, tokenizer, layout, spec)
    models.to(config.torch_device())
    set_gradient_checkpointing(models.full.peft.get_base_model(), config.gradient_checkpointing)
    public = public_set(config, tokenizer)
    vocab = int(base.config.vocab_size)  # the clients' top-k token ids index the logits
    recorder.write_config(
        layout,
        {
            **model_fields(config.method, models),
            "kd_public_set": {"examples": public.examples, "payload_rows": sum(public.rows)},
            "payload": "label log-probs" if public.classification else f"top-{config.kd_topk}",
        },
    )
    shipment = Shipment(models)
    send = RoundTrip(
        grid, shipment, MESSAGE_TYPE, config.round_timeout, recorder.dir, config.example_cap()
    )
    evaluator = ServerEvaluator(config, models, shipment, recorder)
    optimizer = torch.optim.AdamW(models.full.params().values(), lr=config.distill_lr)
    shipment.metrics(0).update(train_loss=float("nan"))
    evaluator(0, ArrayRecord())
    aggregated = None
    for server_round in range(1, config.num_server_rounds + 1):
        nodes = sample_nodes(grid, config)
        body = RecordDict({"config": round_config(config, server_round, models.frozen_digest)})
        if aggregated is not None:
            body[SOFT_LABELS] = payload_record(aggregated)
        metrics = shipment.metrics(server_round)
        down = 0 if aggregated is None else payload_bytes(aggregated) * len(nodes)
        metrics["payload_bytes_down"] = down
        start = time.perf_counter()
        replies, failed = send(server_round, dict.fromkeys(nodes, body))
        metrics["time_client_train_s"] = time.perf_counter() - start
        for node, reply in list(replies.items()):
            problem = payload_problem(
                reply.content.array_records.get(SOFT_LABELS), public, config.kd_topk, vocab
            )
            if problem is not None:
                log(WARNING, "Rejected the reply of node %d: %s", node, problem)
                del replies[node]
                failed.append(node)
        if not replies:
            raise RuntimeError(f"round {server_round}: no usable client reply ({failed})")
        payloads = [
            (record_payload(r.content[SOFT_LABELS]), float(r.content["metrics"]["num-examples"]))
            for r in replies.values()
        ]
        metrics.update(
            clients_sampled=len(nodes),
            clients_failed=len(failed),
            payload_bytes_up=sum(payload_bytes(p) for p, _ in payloads),
            **client_means(list(replies.values())),
        )
        start = time.perf_counter()
        aggregated = aggregate_soft_labels(payloads, k=min(config.kd_topk, vocab))
        result = kd_steps(
            models.full,
            optimizer,
            config.kd_distill_steps,
            public,
            to_targets(aggregated),
            config.kd_temperature,
            kd_weight=1.0,
            first_chunk=(server_round - 1) * config.kd_distill_steps,
        )
        metrics["time_server_s"] = time.perf_counter() - start
        if config.kd_distill_steps:
            metrics["distill_loss"] = result.kd_loss
        log(
            INFO,
            "round %d: client loss %.4f, distill loss %s, payload up %d, down %d bytes",
            server_round,
            metrics.get("train_loss", float("nan")),
            metrics.get("distill_loss", "-"),
            metrics["payload_bytes_up"],
            metrics["payload_bytes_down"],
        )
        evaluator(server_round, ArrayRecord())
    return finish_run(models, config, recorder, evaluator)
