"""The ServerApp: build the models, pre-align, run the method's strategy, save everything."""

from __future__ import annotations

import time
from dataclasses import asdict
from logging import INFO
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from transformers import AutoConfig

from federation.methods import MethodPlan, method_plan
from federation.run_config import ConfigError, RunConfig
from models.blocks import get_blocks
from models.depth_memory import GB, parse_depth_table
from models.distillation import EmulatorDistiller
from models.export import AdapterFiles, export_client_models, exports_complete
from models.fedbiot_models import FedBiOTModels
from models.loading import base_model_id, resolve_model_dir
from models.lora import LoraSpec
from models.memory_estimate import DTYPE_BYTES, Setup, depth_memory
from models.precision import resolve_dtype, set_gradient_checkpointing
from models.wire import to_record
from server_app.checkpoint import (
    check_resume_config,
    load_checkpoint,
    restore,
    save_checkpoint,
)
from server_app.kdfed import run_kdfed
from server_app.model_card import export_with_cards, save_round_adapter
from server_app.results import RunRecorder
from server_app.run_setup import model_fields, open_run, public_batches
from server_app.server_eval import ServerEvaluator
from server_app.split_learning import run_split
from server_app.superlink_guard import check_superlink
from server_app.tracking import check_tracking, close_trackers
from strategies.algorithms import strategy_class
from strategies.client_dp import ClientDP, with_client_dp
from strategies.depth_aggregation import FedBiAlign
from strategies.lr_schedule import round_learning_rate
from strategies.shipment import release_caches

app = ServerApp()


def client_setup(config: RunConfig) -> Setup:
    """The clients' training setting as the run config gives it, for the depth table.

    A node may override ``dtype`` or ``quantization`` in its node config
    (``client_app/node.py``), but the server cannot see node configs before the round, so
    this is the run config's: ``auto`` resolved on the server's device, and a quantized
    client computing in bfloat16 unless its dtype is a half type (``models/quantization``).
    """
    dtype = str(resolve_dtype(config.dtype, config.torch_device(), "run-config dtype"))
    dtype = dtype.removeprefix("torch.")
    bits = {"none": 8 * DTYPE_BYTES[dtype], "8bit": 8, "4bit": 4}[config.quantization]
    return Setup(
        model=config.model,
        drop_rate=config.drop_rate,
        adapter_layers=config.adapter_layers,
        dtype="bfloat16" if bits < 16 and dtype == "float32" else dtype,
        bits=bits,
        batch=config.batch_size,
        seq=config.seq_length,
        checkpointing=config.gradient_checkpointing,
        lora_r=config.lora_r,
    )


def depth_parameters(
    config: RunConfig, models: FedBiOTModels, recorder: RunRecorder
) -> dict[str, object]:
    """FedBiAlign's strategy arguments: the estimated training memory of each adapter depth
    of the table for the clients' setting (``client_setup``), from which each node's budget
    picks. Estimated (``models/memory_estimate.py``), not measured on the server's own model,
    whose dtype and quantization need not be the clients'."""
    layout = models.layout
    table = parse_depth_table(config.depth_table, config.adapter_layers, layout.num_blocks)
    setup = client_setup(config)
    prox = config.prox_epsilon > 0
    model_config = models.full.peft.get_base_model().config
    rows = depth_memory(setup, model_config, layout, table, prox=prox)
    estimated = {d: row["total"] / GB for d, row in rows.items()}
    recorder.write_json(
        "depth_memory.json",
        {
            "estimated_gb": {str(d): gb for d, gb in estimated.items()},
            "settings": asdict(setup) | {"prox": prox},
        },
    )
    log(INFO, "Estimated training memory per adapter depth (GB): %s", estimated)
    return {
        "depth_gb": estimated,
        "budget_timeout": config.round_timeout,
        "history_rounds": config.update_history_rounds,
    }


# How long the end of a run waits for the nodes to release their caches.
RELEASE_TIMEOUT_S = 30.0


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured method for `num-server-rounds` rounds; write the run folder."""
    config = RunConfig.from_flower(context.run_config)
    check_tracking(config.report_to)  # before any weights load
    # KD-FedLLM and split learning exchange logits or activations, not parameters: their
    # own loops, not a strategy.
    failed = True
    try:
        if config.method == "kdfed":
            run_kdfed(grid, config)
        elif config.method == "split":
            run_split(grid, config)
        else:
            run_federation(grid, config)
        failed = False
    finally:  # also after a failed run: its marks would keep entries from eviction a day
        try:
            close_trackers(failed)
        finally:
            release_caches(grid, min(config.round_timeout, RELEASE_TIMEOUT_S))


def _sampling(config: RunConfig, plan: MethodPlan) -> dict[str, float | int | str]:
    """Strategy sampling arguments: one node for the single-client baselines, every
    connected node for the local-only one, else the configured fraction; the others wait
    for ``min-train-nodes`` nodes. Not for ``num-partitions``: the run config's value need
    not be the federation's size (the simulation engine gives each node its own)."""
    fraction_evaluate = config.fraction_evaluate if config.client_eval_examples else 0.0
    if plan.single_client:
        # Flower samples max(int(fraction * nodes), minimum) nodes: exactly one here.
        tiny = 1e-9
        return {
            "fraction_train": tiny,
            "fraction_evaluate": tiny if fraction_evaluate else 0.0,
            "min_train_nodes": 1,
            "min_evaluate_nodes": 1 if fraction_evaluate else 0,
            "min_available_nodes": 1,
            "node_wait_reason": f"method={plan.name} trains on one node",
        }
    min_nodes = config.min_train_nodes
    every = not plan.aggregates
    reason = f"run-config min-train-nodes={min_nodes}"
    return {
        "fraction_train": 1.0 if every else config.fraction_train,
        "fraction_evaluate": 1.0 if every and fraction_evaluate else fraction_evaluate,
        "min_train_nodes": min_nodes,
        "min_evaluate_nodes": min_nodes if fraction_evaluate else 0,
        "min_available_nodes": min_nodes,
        "node_wait_reason": f"{reason}; method=local then trains every connected node"
        if every
        else reason,
    }


def check_layout(config: RunConfig, plan: MethodPlan) -> None:
    """Refuse a layout the model cannot hold (``adapter-layers``, ``drop-rate``) from the
    model's config.json alone, before its weights load or the run folder is made."""
    try:
        model_config = AutoConfig.from_pretrained(resolve_model_dir(config.model))
    except (OSError, ValueError):
        return  # load_model reports an unreadable model with its own message
    num_blocks = getattr(model_config, "num_hidden_layers", None)
    if isinstance(num_blocks, int):
        try:
            plan.layout(config, num_blocks)
        except ValueError as error:
            raise ConfigError(f"run-config {error} (model={config.model!r})") from None


def run_federation(grid: Grid, config: RunConfig) -> Path:
    """The whole server side of a run; returns the run's results folder."""
    plan = method_plan(config)
    check_layout(config, plan)
    checkpoint, resume_dir = (
        load_checkpoint(config.resume_from) if config.resume_from else ({}, None)
    )
    if checkpoint:
        check_resume_config(checkpoint["config"] or {}, config, Path(config.resume_from))
    if checkpoint and not plan.aggregates:
        raise ConfigError("resume-from: the local-only baseline keeps per-node state; rerun it")
    if checkpoint and checkpoint["round"] >= config.num_server_rounds:
        finished = checkpoint["round"] > config.num_server_rounds or exports_complete(
            resume_dir, plan.emulated
        )
        if finished:
            raise ConfigError(
                f"resume-from: the checkpoint is of round {checkpoint['round']}; "
                f"num-server-rounds={config.num_server_rounds} leaves nothing to do"
            )
        log(INFO, "Round %d was checkpointed; finishing the export", checkpoint["round"])
    recorder, base, tokenizer = open_run(config, plan, resume_dir, checkpoint.get("round"))
    layout = plan.layout(config, len(get_blocks(base)))
    spec = LoraSpec(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout)
    models = FedBiOTModels(base, tokenizer, layout, spec)
    models.to(config.torch_device())
    # Distillation trains the compressed model (the full one is its no-grad teacher).
    set_gradient_checkpointing(
        models.compressed.peft.get_base_model(), config.gradient_checkpointing
    )
    recorder.write_config(layout, model_fields(plan.name, models))
    log(
        INFO,
        "%s on %d blocks: adapter %s, emulator %s",
        plan.name,
        layout.num_blocks,
        list(layout.adapter_blocks),
        list(layout.emulator_blocks),
    )

    distiller, prealign = None, {}
    start = time.perf_counter()
    if plan.emulated:
        distiller = EmulatorDistiller(
            models, public_batches(config, tokenizer), config.distill_lr, config.kd_lambda,
            hidden_norm=config.distill_hidden_norm,
        )  # fmt: skip
        if not checkpoint:
            prealign = distiller.run(config.prealign_steps)
            log(INFO, "Pre-alignment (%d steps): %s", config.prealign_steps, prealign)

    cls, algorithm_params = strategy_class(config, plan.aggregates)
    if plan.name == "fedbialign":
        cls, algorithm_params = FedBiAlign, depth_parameters(config, models, recorder)
    if config.dp_clipping_norm > 0:
        cls = with_client_dp(
            cls,
            ClientDP(
                config.dp_clipping_norm,
                config.dp_noise_multiplier,
                config.dp_delta,
                population=config.num_partitions,
            ),
        )
    strategy = cls(
        models=models,
        distiller=distiller,
        distill_steps=config.distill_steps if plan.distill_every_round else 0,
        learning_rate=lambda r: round_learning_rate(
            r,
            config.num_server_rounds,
            config.learning_rate,
            config.learning_rate_min,
            config.lr_scheduler,
        ),
        stage=config.stage_of,
        audit_path=recorder.dir / "sent_arrays.jsonl",
        before_write=check_superlink,
        max_norm_ratio=config.max_update_norm_ratio,
        max_update_norm=config.max_update_norm,
        max_examples=config.example_cap(),
        fixed_dpo_reference=config.dpo_reference == "fixed",
        node_wait_timeout=config.node_wait_timeout,
        offer_timeout=config.round_timeout,
        **_sampling(config, plan),
        **algorithm_params,
    )
    if checkpoint:
        strategy.round_offset = restore(checkpoint, models, strategy, distiller)
        log(INFO, "Resumed after round %d from %s", strategy.round_offset, config.resume_from)
    strategy.round_metrics[0] = {
        "train_loss": float("nan"),
        "distill_loss": prealign.get("distill_loss", float("nan")),
        "bytes_up": 0,
        "bytes_down": 0,
        "time_prealign_s": time.perf_counter() - start,
        **{f"prealign_{k}": v for k, v in prealign.items()},
    }
    evaluator = ServerEvaluator(config, models, strategy, recorder)

    def evaluate_and_checkpoint(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round += strategy.round_offset
        if checkpoint and server_round == strategy.round_offset:
            return None  # evaluated before the server stopped
        result = evaluator(server_round, arrays)
        start = time.perf_counter()
        every = config.checkpoint_every
        if (
            server_round
            and every
            and (server_round % every == 0 or server_round == config.num_server_rounds)
        ):
            save_checkpoint(
                recorder.dir / "checkpoints", server_round, models, strategy, distiller, config
            )
        save_round_adapter(models, config, recorder, server_round)
        recorder.amend_round(server_round, {"time_checkpoint_s": time.perf_counter() - start})
        return result

    strategy.start(
        grid=grid,
        initial_arrays=to_record(models.adapter_state()),
        num_rounds=config.num_server_rounds - strategy.round_offset,
        timeout=config.round_timeout,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
        evaluate_fn=evaluate_and_checkpoint,
    )
    check_superlink()
    if plan.aggregates:
        outputs = export_with_cards(models, config, recorder)
    else:
        files = AdapterFiles(base_model=base_model_id(config.model))
        outputs = export_client_models(
            models, strategy.client_arrays, recorder.dir, strategy.client_partitions, files
        )
    log(INFO, "Saved %s", ", ".join(f"{k} to {v}" for k, v in outputs.items()))
    side_by_side = evaluator.open_ended(
        recorder.dir, config.open_ended_examples, config.eval_max_new_tokens
    )
    if side_by_side is not None:
        log(INFO, "Open-ended answers side by side in %s", side_by_side)
    return recorder.dir
