"""Split-FedLLM: the client runs the bottom ``k`` blocks, the server the rest and the head.

Clients receive once a model package holding only the embeddings and blocks ``[0, k)`` (the
final norm and the tied head come along in the package but are unused). Every training step
is an exchange of Flower messages (``client_app/exchange.split_step``): the client sends its
activations at the cut, the attention mask and the labels; the server runs its blocks, the
loss and the backward pass, steps its own LoRA (one AdamW step per client batch, state kept
across rounds) and replies with the gradient of the activations. Clients take their steps
in parallel; the server handles their batches one after the other. At the end of a round the
clients send their LoRA, which the server averages weighted by example counts
(SplitLoRA-style) and sends back at the start of the next round.

Activations and gradients travel in ``split-dtype`` (``models.split_model``). ``steps.csv``
records every step's bytes per client: ``payload_up`` (activations + mask + labels),
``activation_bytes_up``, ``payload_down`` (the gradient) and Flower's counts of the same
records, with the batch's shape. The global model evaluated and exported is the full model
with the averaged client LoRA and the server LoRA.
"""

from __future__ import annotations

import csv
import time
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from federation.messages import ACTIVATIONS, GRADIENT
from federation.run_config import ConfigError, RunConfig
from models.blocks import extract_blocks, get_blocks
from models.fedbiot_models import FedBiOTModels
from models.layout import full_layout
from models.lora import LoraSpec
from models.split_model import (
    ServerPart,
    pack_activations,
    payload_bytes,
    split_model,
    unpack_forward,
)
from models.wire import from_record, record_bytes, to_record
from server_app.exchange_loop import (
    RoundTrip,
    finish_run,
    round_config,
    sample_nodes,
    start_run,
)
from server_app.run_setup import model_fields
from server_app.server_eval import ServerEvaluator
from server_app.split_checks import forward_problem, screen_finals
from strategies.shipment import Shipment

MESSAGE_TYPE = "train.split"
STEP_COLUMNS = (
    "round",
    "step",
    "node",
    "batch",
    "tokens",
    "hidden",
    "activation_bytes_up",
    "payload_up",
    "bytes_up",
    "payload_down",
    "bytes_down",
    "loss",
    "server_seconds",
)


def split_point(config: RunConfig, num_blocks: int) -> int:
    """``split-point``, 0 meaning half of the blocks; must leave both sides a block."""
    k = config.split_point or num_blocks // 2
    if not 1 <= k < num_blocks:
        raise ConfigError(
            f"run-config split-point={config.split_point} must be in [1, {num_blocks - 1}] "
            f"for a model of {num_blocks} blocks (0: half)"
        )
    return k


class SplitServer:
    """The server's part: its LoRA, its optimizer, and the log of every step."""

    def __init__(self, models: FedBiOTModels, k: int, config: RunConfig, log_path: Path) -> None:
        self.models, self.k, self.config = models, k, config
        n = models.layout.num_blocks
        models.full.train_only(range(k, n))
        self.part: ServerPart = split_model(models.full, k)[1]
        # What a client's activations must match (server_app/split_checks.py).
        model_config = models.full.peft.get_base_model().config
        self.hidden_size, self.vocab = int(model_config.hidden_size), int(model_config.vocab_size)
        self.optimizer = torch.optim.AdamW(
            self.part.trainable(), lr=config.learning_rate, weight_decay=config.weight_decay
        )
        self.log_path = log_path
        with open(log_path, "w", newline="") as f:
            csv.writer(f).writerow(STEP_COLUMNS)

    def step(self, reply: Message, learning_rate: float) -> tuple[float, dict[str, object]]:
        """One client batch through the server's part: ``(loss, the gradient record parts)``."""
        arrays = {k: a.numpy() for k, a in reply.content[ACTIVATIONS].items()}
        meta = dict(reply.content[f"{ACTIVATIONS}-meta"])
        start = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        self.models.full.peft.train()
        hidden, mask, labels = unpack_forward(arrays, meta, self.part.device, self.part.dtype)
        loss, grad = self.part.step(hidden, mask, labels)
        torch.nn.utils.clip_grad_norm_(self.part.trainable(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.models.full.peft.eval()
        grad_array, grad_meta = pack_activations(grad, self.config.split_dtype)
        row = {
            "batch": arrays["labels"].shape[0],
            "tokens": arrays["labels"].shape[1],
            "hidden": arrays["hidden"].shape[2],
            "activation_bytes_up": int(arrays["hidden"].nbytes),
            "payload_up": payload_bytes(arrays),
            "bytes_up": record_bytes(reply.content[ACTIVATIONS]),
            "payload_down": int(grad_array.nbytes),
            "loss": float(loss),
            "server_seconds": time.perf_counter() - start,
            "grad": (grad_array, grad_meta),
        }
        return float(loss), row

    def write_row(self, row: dict[str, object]) -> None:
        with open(self.log_path, "a", newline="") as f:
            csv.writer(f).writerow([row[c] for c in STEP_COLUMNS])


def _step_body(
    config: ConfigRecord, step: int, final: bool, grad: tuple | None, lora: ArrayRecord | None
) -> RecordDict:
    """Message ``step``: the gradient of step ``step - 1`` and/or the round's client LoRA."""
    body_config = ConfigRecord({**dict(config.items()), "step": step, "final": final})
    body = RecordDict({"config": body_config})
    if lora is not None:
        body["arrays"] = lora
    if grad is not None:
        array, meta = grad
        body[GRADIENT] = ArrayRecord({"hidden": Array(array)})
        body[f"{GRADIENT}-meta"] = ConfigRecord(meta)
    return body


def _split_round(
    server_round: int,
    send: RoundTrip,
    server: SplitServer,
    nodes: list[int],
    round_config: ConfigRecord,
) -> dict[str, float]:
    """Step 0 sends the client LoRA, steps 1..K the gradients, K returns the client LoRA."""
    config, models, k = server.config, server.models, server.k
    lora = to_record(models.full.state(range(k)))
    grads: dict[int, tuple | None] = dict.fromkeys(nodes)
    rows: dict[int, dict[str, object]] = {}
    losses, failed, server_seconds, client_seconds = [], 0, 0.0, 0.0
    finals: list[Message] = []
    steps = config.local_steps
    lr = float(round_config["learning-rate"])
    for step in range(steps + 1):
        bodies = {
            node: _step_body(
                round_config, step, step == steps, grads[node], lora if not step else None
            )
            for node in grads
        }
        replies, lost = send(server_round, bodies, step)
        for node in lost:
            grads.pop(node)
            failed += 1
        for node, reply in sorted(replies.items()):
            # Bookkeeping only: a reply without it reports no client time.
            client_seconds += float(reply.content["metrics"].get("client_seconds", 0.0))
            if node in rows:  # the gradient of the previous step went down with this message
                previous = rows.pop(node)
                previous["bytes_down"] = record_bytes(bodies[node][GRADIENT])
                server.write_row(previous)
            if step == steps:
                finals.append(reply)
                continue
            problem = forward_problem(reply, server.hidden_size, server.vocab, config.split_dtype)
            if problem is not None:  # the node is out of this round; the others go on
                log(
                    WARNING,
                    "round %d step %d: dropped node %d: %s",
                    server_round,
                    step,
                    node,
                    problem,
                )
                grads.pop(node)
                failed += 1
                continue
            loss, row = server.step(reply, lr)
            server_seconds += float(row["server_seconds"])
            grads[node] = row.pop("grad")
            rows[node] = {"round": server_round, "step": step, "node": node, **row}
            losses.append(loss)
    finals, rejected = screen_finals(
        finals, lora, config.max_update_norm_ratio, config.max_update_norm
    )
    failed += len(rejected)
    if not finals:
        raise RuntimeError(
            f"round {server_round}: no client finished with a usable LoRA ({failed} failed)"
        )
    start = time.perf_counter()
    averaged = aggregate_arrayrecords([r.content for r in finals], "num-examples")
    models.full.load_state(from_record(averaged))
    server_seconds += time.perf_counter() - start
    return {
        "train_loss": sum(losses) / max(len(losses), 1),
        "clients_sampled": len(nodes),
        "clients_failed": failed,
        "clients_averaged": len(finals),
        "time_server_s": server_seconds,
        "client_seconds": client_seconds / len(nodes),
    }


def run_split(grid: Grid, config: RunConfig) -> Path:
    """The whole server side of a split-learning run; returns the results folder."""
    recorder, base, tokenizer = start_run(config)
    n = len(get_blocks(base))
    k = split_point(config, n)
    spec = LoraSpec(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout)
    # The client's package is cut before the server's model gets its LoRA layers.
    client_package = FedBiOTModels(
        extract_blocks(base, tuple(range(k))), tokenizer, full_layout(k), spec
    )
    layout = full_layout(n)
    models = FedBiOTModels(base, tokenizer, layout, spec)
    models.to(config.torch_device())
    recorder.write_config(
        layout,
        {
            **model_fields(config.method, models),
            "split_point": k,
            "client_blocks": list(range(k)),
            "server_blocks": list(range(k, n)),
            "client_model_digest": client_package.frozen_digest,
            "client_model_bytes": record_bytes(client_package.frozen),
        },
    )
    shipment = Shipment(client_package)
    send = RoundTrip(
        grid, shipment, MESSAGE_TYPE, config.round_timeout, recorder.dir, config.example_cap()
    )
    server = SplitServer(models, k, config, recorder.dir / "steps.csv")
    evaluator = ServerEvaluator(config, models, shipment, recorder)
    shipment.metrics(0).update(train_loss=float("nan"))
    evaluator(0, ArrayRecord())
    for server_round in range(1, config.num_server_rounds + 1):
        nodes = sample_nodes(grid, config)
        config_record = round_config(config, server_round, client_package.frozen_digest)
        start = time.perf_counter()
        metrics = _split_round(server_round, send, server, nodes, config_record)
        metrics["time_client_train_s"] = time.perf_counter() - start
        shipment.metrics(server_round).update(metrics)
        log(
            INFO,
            "round %d (split at %d): loss %.4f, bytes up %d, down %d",
            server_round,
            k,
            metrics["train_loss"],
            shipment.metrics(server_round)["bytes_up"],
            shipment.metrics(server_round)["bytes_down"],
        )
        evaluator(server_round, ArrayRecord())
    return finish_run(models, config, recorder, evaluator)
