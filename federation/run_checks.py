"""The run config's value checks, one ``(holds, message)`` pair per rule, so that
``RunConfig.validate`` names every key it refuses (kept apart from the key table)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from federation.run_choices import (
    ALGORITHMS,
    DISTILL_HIDDEN_NORMS,
    DPO_REFERENCES,
    EVAL_SPLITS,
    LR_SCHEDULERS,
    METHODS,
    PARTITIONERS,
    REPORT_TO,
    SPLIT_DTYPES,
    STAGES,
    TASKS_WITH_TEST_SPLIT,
)
from models.formats import DTYPES, QUANTIZATION_MODES

if TYPE_CHECKING:
    from federation.run_config import RunConfig

Checks = list[tuple[bool, str]]


def value_checks(config: RunConfig) -> Checks:
    """Ranges and choices of the training, evaluation and deployment keys."""
    name = config.run_name
    checks = [
        (config.weight_decay >= 0, "weight-decay must be >= 0"),
        (0 <= config.seed < 2**32, f"seed={config.seed} must be in [0, 2**32)"),
        (
            not (set(name) & {"/", "\\", "\0"}) and ".." not in name and name != ".",
            f"run-name={name!r} must be a plain folder name (no path separator, no "
            "'..'): run folders stay inside output-dir",
        ),
        (config.max_update_norm >= 0, "max-update-norm must be >= 0 (0: off)"),
        (config.cache_max_gb >= 0, "cache-max-gb must be >= 0 (0: no limit)"),
        (config.cache_ephemeral in (0, 1), "cache-ephemeral must be 0 or 1"),
        (config.max_num_examples >= 0, "max-num-examples must be >= 0 (0: auto)"),
    ]
    checks += [
        (config.method in METHODS, f"method={config.method!r} must be one of {METHODS}"),
        (
            config.algorithm in ALGORITHMS,
            f"algorithm={config.algorithm!r} must be one of {ALGORITHMS}",
        ),
        (
            config.lr_scheduler in LR_SCHEDULERS,
            f"lr-scheduler={config.lr_scheduler!r} must be one of {LR_SCHEDULERS}",
        ),
        (
            config.distill_hidden_norm in DISTILL_HIDDEN_NORMS,
            f"distill-hidden-norm={config.distill_hidden_norm!r} must be one of "
            f"{DISTILL_HIDDEN_NORMS}",
        ),
        (
            0 < config.learning_rate_min <= config.learning_rate,
            "learning-rate-min must be in (0, learning-rate]",
        ),
        (config.proximal_mu >= 0, "proximal-mu must be >= 0"),
        (config.server_learning_rate > 0, "server-learning-rate must be > 0"),
        (0.0 <= config.server_momentum < 1.0, "server-momentum must be in [0, 1)"),
        (config.fedopt_eta > 0, "fedopt-eta must be > 0"),
        (0.0 <= config.fedopt_beta_1 < 1.0, "fedopt-beta-1 must be in [0, 1)"),
        (0.0 <= config.fedopt_beta_2 < 1.0, "fedopt-beta-2 must be in [0, 1)"),
        (config.fedopt_tau > 0, "fedopt-tau must be > 0"),
        (0.0 <= config.trimmed_beta < 0.5, "trimmed-beta must be in [0, 0.5)"),
        (config.krum_malicious >= 0, "krum-malicious must be >= 0"),
        (config.max_update_norm_ratio >= 0, "max-update-norm-ratio must be >= 0 (0: off)"),
        (
            config.partitioner in PARTITIONERS,
            f"partitioner={config.partitioner!r} must be one of {PARTITIONERS}",
        ),
        (config.num_partitions >= 1, "num-partitions must be >= 1"),
        (config.num_server_rounds >= 1, "num-server-rounds must be >= 1"),
        (0.0 < config.fraction_train <= 1.0, "fraction-train must be in (0, 1]"),
        (0.0 <= config.fraction_evaluate <= 1.0, "fraction-evaluate must be in [0, 1]"),
        (config.min_train_nodes >= 1, "min-train-nodes must be >= 1"),
        (config.local_steps >= 1, "local-steps must be >= 1"),
        (config.batch_size >= 1, "batch-size must be >= 1"),
        (config.seq_length >= 16, "seq-length must be >= 16"),
        (config.learning_rate > 0, "learning-rate must be > 0"),
        (config.distill_lr > 0, "distill-lr must be > 0"),
        (config.lora_r >= 1, "lora-r must be >= 1"),
        (config.lora_alpha > 0, "lora-alpha must be > 0"),
        (0.0 <= config.lora_dropout < 1.0, "lora-dropout must be in [0, 1)"),
        (config.adapter_layers >= 1, "adapter-layers must be >= 1"),
        (0.0 <= config.drop_rate < 1.0, f"drop-rate={config.drop_rate} must be in [0, 1)"),
        (config.prealign_steps >= 0, "prealign-steps must be >= 0"),
        (config.distill_steps >= 0, "distill-steps must be >= 0"),
        (config.kd_lambda >= 0, "kd-lambda must be >= 0"),
        (config.prox_epsilon >= 0, "prox-epsilon must be >= 0"),
        (config.public_examples >= 1, "public-examples must be >= 1"),
        (config.eval_examples >= 0, "eval-examples must be >= 0"),
        (
            config.eval_split in EVAL_SPLITS,
            f"eval-split={config.eval_split!r} must be one of {EVAL_SPLITS}",
        ),
        (
            config.eval_split != "test" or config.task in TASKS_WITH_TEST_SPLIT,
            f"eval-split='test' needs a task with a test split {TASKS_WITH_TEST_SPLIT}",
        ),
        (bool(config.split.strip()), "split must name a split, e.g. 'train'"),
        (
            not (config.split == "test" and config.resolved_eval_split == "test"),
            "split='test' would train on the texts the server evaluates: use "
            "eval-split=validation, or train on another split",
        ),
        (config.client_eval_examples >= 0, "client-eval-examples must be >= 0"),
        (config.fidelity_examples >= 0, "fidelity-examples must be >= 0"),
        (config.eval_every >= 0, "eval-every must be >= 0"),
        (config.eval_generation_examples >= 0, "eval-generation-examples must be >= 0"),
        (config.eval_max_new_tokens >= 1, "eval-max-new-tokens must be >= 1"),
        (
            config.banking77_eval in ("generate", "rank"),
            f"banking77-eval={config.banking77_eval!r} must be 'generate' or 'rank'",
        ),
        (0 <= config.open_ended_examples <= 80, "open-ended-examples must be in [0, 80]"),
        (0.0 < config.test_fraction < 1.0, "test-fraction must be in (0, 1)"),
        (config.round_timeout > 0, "round-timeout must be > 0"),
        (config.node_wait_timeout > 0, "node-wait-timeout must be > 0"),
        (config.checkpoint_every >= 0, "checkpoint-every must be >= 0 (0: never)"),
        (config.save_every_round >= 0, "save-every-round must be >= 0 (0: off)"),
        (
            not config.save_every_round or config.method not in ("kdfed", "split", "local"),
            f"save-every-round: method={config.method} has no global adapter per round",
        ),
        (
            config.report_to in REPORT_TO,
            f"report-to={config.report_to!r} must be one of {REPORT_TO}",
        ),
        (config.num_threads >= 0, "num-threads must be >= 0 (0: all cores)"),
        (
            config.device in ("auto", "cpu", "cuda") or config.device.startswith("cuda:"),
            f"device={config.device!r} must be auto, cpu, cuda or cuda:N",
        ),
        (
            config.quantization in QUANTIZATION_MODES,
            f"quantization={config.quantization!r} must be one of {QUANTIZATION_MODES}",
        ),
        (config.dtype in DTYPES, f"dtype={config.dtype!r} must be one of {DTYPES}"),
        (config.grad_accum_steps >= 1, "grad-accum-steps must be >= 1"),
        (
            config.grad_accum_steps == 1 or config.method not in ("kdfed", "split"),
            f"grad-accum-steps={config.grad_accum_steps} is not supported with "
            f"method={config.method} (one batch per client step); use 1",
        ),
    ]
    return checks


def alignment_checks(config: RunConfig) -> Checks:
    """DPO stages, per-client adapter depth, KD, split learning and client-level DP."""
    stage = config.resolved_stage
    dp = config.dp_clipping_norm > 0
    return [
        (config.stage in STAGES, f"stage={config.stage!r} must be one of {STAGES}"),
        (config.dpo_beta > 0, "dpo-beta must be > 0"),
        (
            config.dpo_reference in DPO_REFERENCES,
            f"dpo-reference={config.dpo_reference!r} must be one of {DPO_REFERENCES}",
        ),
        (
            stage != "sft+dpo" or 1 <= config.dpo_rounds < config.num_server_rounds,
            f"dpo-rounds={config.dpo_rounds} must be in [1, num-server-rounds) with "
            "stage sft+dpo (some SFT rounds, then DPO rounds)",
        ),
        (config.preference_eval_pairs >= 0, "preference-eval-pairs must be >= 0"),
        (
            re.fullmatch(r"all|\d+(,\d+)*", config.preference_clients.replace(" ", "")) is not None,
            f"preference-clients={config.preference_clients!r} must be 'all' or partition "
            "ids like '0,2'",
        ),
        (
            config.method != "fedbialign" or bool(config.depth_table),
            "method=fedbialign needs depth-table, e.g. depth-table='1,2'",
        ),
        (
            not config.depth_table or config.method == "fedbialign",
            "depth-table is for method=fedbialign (per-client adapter depth)",
        ),
        (
            config.method != "fedbialign" or config.algorithm == "fedavg",
            "method=fedbialign aggregates per block with FedAvg: use algorithm=fedavg",
        ),
        (config.update_history_rounds >= 1, "update-history-rounds must be >= 1"),
        (config.split_point >= 0, "split-point must be >= 0 (0: half of the blocks)"),
        (
            config.split_dtype in SPLIT_DTYPES,
            f"split-dtype={config.split_dtype!r} must be one of {SPLIT_DTYPES}",
        ),
        (config.kd_topk >= 1, "kd-topk must be >= 1"),
        (0.0 <= config.kd_weight <= 1.0, "kd-weight must be in [0, 1]"),
        (config.kd_temperature > 0, "kd-temperature must be > 0"),
        (config.kd_public_examples >= 1, "kd-public-examples must be >= 1"),
        (config.kd_distill_steps >= 0, "kd-distill-steps must be >= 0"),
        (config.dp_clipping_norm >= 0, "dp-clipping-norm must be >= 0 (0: off)"),
        (config.dp_noise_multiplier >= 0, "dp-noise-multiplier must be >= 0"),
        (0.0 < config.dp_delta < 1.0, "dp-delta must be in (0, 1)"),
        (
            not dp or config.max_update_norm_ratio == 0,
            "dp-clipping-norm > 0 needs max-update-norm-ratio=0 (clipping bounds every "
            "update; the median screen would let one client get another rejected)",
        ),
        (
            not dp or config.method != "local",
            "dp-clipping-norm > 0 needs a method that aggregates",
        ),
    ]
