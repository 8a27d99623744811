"""The run configuration: every knob of `[tool.flwr.app.config]`, typed and validated.

Server and clients read the same keys, so both parse with ``RunConfig.from_flower``. Bad
values fail here with the key's name, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, fields
from typing import Any

import torch

from federation.run_choices import (
    ALGORITHMS,
    DPO_REFERENCES,
    EVAL_SPLITS,
    LR_SCHEDULERS,
    METHODS,
    PARTITIONERS,
    REPORT_TO,
    SPLIT_DTYPES,
    STAGES,
    TASKS_WITH_TEST_SPLIT,
    parse_tasks,
)
from models.precision import DTYPES
from models.quantization import QUANTIZATION_MODES
from task_data import Columns, load_preferences, load_records


class ConfigError(ValueError):
    """A run-config value is unknown, of the wrong type or out of range."""


@dataclass(frozen=True)
class RunConfig:
    """One run's settings; attribute ``foo_bar`` is run-config key ``foo-bar``."""

    method: str = "fedbiot"
    algorithm: str = "fedavg"
    model: str = "smollm2-135m"
    task: str = "banking77"
    public_data: str = "gpteacher"
    split: str = "train"
    subset: str = ""
    instruction_column: str = ""
    input_column: str = ""
    output_column: str = ""
    label_column: str = ""
    num_partitions: int = 3
    partitioner: str = "iid"
    dirichlet_alpha: float = 0.5
    num_server_rounds: int = 3
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    fraction_evaluate: float = 1.0
    local_steps: int = 10
    batch_size: int = 4
    seq_length: int = 128
    learning_rate: float = 1e-3
    lr_scheduler: str = "constant"
    learning_rate_min: float = 1e-6
    weight_decay: float = 0.0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    adapter_layers: int = 2
    drop_rate: float = 0.2
    prealign_steps: int = 20
    distill_steps: int = 5
    distill_lr: float = 1e-3
    kd_lambda: float = 1.0
    prox_epsilon: float = 0.01
    proximal_mu: float = 0.01
    server_learning_rate: float = 1.0
    server_momentum: float = 0.9
    fedopt_eta: float = 1e-3
    fedopt_beta_1: float = 0.9
    fedopt_beta_2: float = 0.99
    fedopt_tau: float = 1e-3
    trimmed_beta: float = 0.2
    krum_malicious: int = 0
    max_update_norm_ratio: float = 10.0
    max_update_norm: float = 0.0
    max_num_examples: int = 0
    stage: str = "auto"
    dpo_rounds: int = 1
    dpo_beta: float = 0.1
    dpo_reference: str = "round"
    preference_data: str = "hh-rlhf"
    preference_clients: str = "all"
    preference_eval_pairs: int = 32
    depth_table: str = ""
    memory_budgets: str = ""
    update_history_rounds: int = 100
    dp_clipping_norm: float = 0.0
    dp_noise_multiplier: float = 1.0
    dp_delta: float = 1e-5
    split_point: int = 0
    split_dtype: str = "fp16"
    kd_topk: int = 8
    kd_weight: float = 0.5
    kd_temperature: float = 1.0
    kd_public_examples: int = 64
    kd_distill_steps: int = 5
    public_examples: int = 256
    eval_examples: int = 300
    eval_split: str = "auto"
    client_eval_examples: int = 16
    eval_tasks: str = "auto"
    eval_every: int = 0
    eval_generation_examples: int = 50
    eval_max_new_tokens: int = 128
    banking77_eval: str = "rank"
    open_ended_examples: int = 0
    test_fraction: float = 0.1
    seed: int = 42
    output_dir: str = "results"
    run_name: str = ""
    data_dir: str = ""
    cache_dir: str = ""
    cache_max_gb: float = 0.0
    cache_ephemeral: int = 0
    round_timeout: float = 7200.0
    node_wait_timeout: float = 600.0
    checkpoint_every: int = 1
    save_every_round: int = 0
    report_to: str = "none"
    resume_from: str = ""
    num_threads: int = 0
    device: str = "auto"
    quantization: str = "none"
    dtype: str = "auto"
    gradient_checkpointing: bool = False
    grad_accum_steps: int = 1

    @staticmethod
    def key(name: str) -> str:
        return name.replace("_", "-")

    @classmethod
    def from_flower(cls, run_config: dict[str, Any]) -> RunConfig:
        """Parse Flower's run config (defaults from pyproject plus `--run-config`)."""
        known = {cls.key(f.name): f for f in fields(cls)}
        unknown = sorted(set(run_config) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown run-config key(s) {', '.join(unknown)}; known keys: "
                + ", ".join(sorted(known))
            )
        values = {}
        for key, value in run_config.items():
            f = known[key]
            expected = {"int": int, "float": float, "str": str, "bool": bool}[f.type]
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, expected) or (isinstance(value, bool) != (expected is bool)):
                raise ConfigError(f"run-config {key}={value!r} must be of type {expected.__name__}")
            values[f.name] = value
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Range checks; layout checks that need the model's depth come later."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "float" and not math.isfinite(value):
                raise ConfigError(f"run-config {self.key(f.name)}={value} must be finite")
        name = self.run_name
        checks = [
            (self.weight_decay >= 0, "weight-decay must be >= 0"),
            (0 <= self.seed < 2**32, f"seed={self.seed} must be in [0, 2**32)"),
            (
                not (set(name) & {"/", "\\", "\0"}) and ".." not in name and name != ".",
                f"run-name={name!r} must be a plain folder name (no path separator, no "
                "'..'): run folders stay inside output-dir",
            ),
            (self.max_update_norm >= 0, "max-update-norm must be >= 0 (0: off)"),
            (self.cache_max_gb >= 0, "cache-max-gb must be >= 0 (0: no limit)"),
            (self.cache_ephemeral in (0, 1), "cache-ephemeral must be 0 or 1"),
            (self.max_num_examples >= 0, "max-num-examples must be >= 0 (0: auto)"),
        ]
        checks += [
            (self.method in METHODS, f"method={self.method!r} must be one of {METHODS}"),
            (
                self.algorithm in ALGORITHMS,
                f"algorithm={self.algorithm!r} must be one of {ALGORITHMS}",
            ),
            (
                self.lr_scheduler in LR_SCHEDULERS,
                f"lr-scheduler={self.lr_scheduler!r} must be one of {LR_SCHEDULERS}",
            ),
            (
                0 < self.learning_rate_min <= self.learning_rate,
                "learning-rate-min must be in (0, learning-rate]",
            ),
            (self.proximal_mu >= 0, "proximal-mu must be >= 0"),
            (self.server_learning_rate > 0, "server-learning-rate must be > 0"),
            (0.0 <= self.server_momentum < 1.0, "server-momentum must be in [0, 1)"),
            (self.fedopt_eta > 0, "fedopt-eta must be > 0"),
            (0.0 <= self.fedopt_beta_1 < 1.0, "fedopt-beta-1 must be in [0, 1)"),
            (0.0 <= self.fedopt_beta_2 < 1.0, "fedopt-beta-2 must be in [0, 1)"),
            (self.fedopt_tau > 0, "fedopt-tau must be > 0"),
            (0.0 <= self.trimmed_beta < 0.5, "trimmed-beta must be in [0, 0.5)"),
            (self.krum_malicious >= 0, "krum-malicious must be >= 0"),
            (self.max_update_norm_ratio >= 0, "max-update-norm-ratio must be >= 0 (0: off)"),
            (
                self.partitioner in PARTITIONERS,
                f"partitioner={self.partitioner!r} must be one of {PARTITIONERS}",
            ),
            (self.num_partitions >= 1, "num-partitions must be >= 1"),
            (self.num_server_rounds >= 1, "num-server-rounds must be >= 1"),
            (0.0 < self.fraction_train <= 1.0, "fraction-train must be in (0, 1]"),
            (0.0 <= self.fraction_evaluate <= 1.0, "fraction-evaluate must be in [0, 1]"),
            (self.min_train_nodes >= 1, "min-train-nodes must be >= 1"),
            (self.local_steps >= 1, "local-steps must be >= 1"),
            (self.batch_size >= 1, "batch-size must be >= 1"),
            (self.seq_length >= 16, "seq-length must be >= 16"),
            (self.learning_rate > 0, "learning-rate must be > 0"),
            (self.distill_lr > 0, "distill-lr must be > 0"),
            (self.lora_r >= 1, "lora-r must be >= 1"),
            (self.lora_alpha > 0, "lora-alpha must be > 0"),
            (0.0 <= self.lora_dropout < 1.0, "lora-dropout must be in [0, 1)"),
            (self.adapter_layers >= 1, "adapter-layers must be >= 1"),
            (0.0 <= self.drop_rate < 1.0, f"drop-rate={self.drop_rate} must be in [0, 1)"),
            (self.prealign_steps >= 0, "prealign-steps must be >= 0"),
            (self.distill_steps >= 0, "distill-steps must be >= 0"),
            (self.kd_lambda >= 0, "kd-lambda must be >= 0"),
            (self.prox_epsilon >= 0, "prox-epsilon must be >= 0"),
            (self.public_examples >= 1, "public-examples must be >= 1"),
            (self.eval_examples >= 0, "eval-examples must be >= 0"),
            (
                self.eval_split in EVAL_SPLITS,
                f"eval-split={self.eval_split!r} must be one of {EVAL_SPLITS}",
            ),
            (
                self.eval_split != "test" or self.task in TASKS_WITH_TEST_SPLIT,
                f"eval-split='test' needs a task with a test split {TASKS_WITH_TEST_SPLIT}",
            ),
            (bool(self.split.strip()), "split must name a split, e.g. 'train'"),
            (
                not (self.split == "test" and self.resolved_eval_split == "test"),
                "split='test' would train on the texts the server evaluates: use "
                "eval-split=validation, or train on another split",
            ),
            (self.client_eval_examples >= 0, "client-eval-examples must be >= 0"),
            (self.eval_every >= 0, "eval-every must be >= 0"),
            (self.eval_generation_examples >= 0, "eval-generation-examples must be >= 0"),
            (self.eval_max_new_tokens >= 1, "eval-max-new-tokens must be >= 1"),
            (
                self.banking77_eval in ("generate", "rank"),
                f"banking77-eval={self.banking77_eval!r} must be 'generate' or 'rank'",
            ),
            (0 <= self.open_ended_examples <= 80, "open-ended-examples must be in [0, 80]"),
            (0.0 < self.test_fraction < 1.0, "test-fraction must be in (0, 1)"),
            (self.round_timeout > 0, "round-timeout must be > 0"),
            (self.node_wait_timeout > 0, "node-wait-timeout must be > 0"),
            (self.checkpoint_every >= 0, "checkpoint-every must be >= 0 (0: never)"),
            (self.save_every_round >= 0, "save-every-round must be >= 0 (0: off)"),
            (
                not self.save_every_round or self.method not in ("kdfed", "split", "local"),
                f"save-every-round: method={self.method} has no global adapter per round",
            ),
            (
                self.report_to in REPORT_TO,
                f"report-to={self.report_to!r} must be one of {REPORT_TO}",
            ),
            (self.num_threads >= 0, "num-threads must be >= 0 (0: all cores)"),
            (
                self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
                f"device={self.device!r} must be auto, cpu, cuda or cuda:N",
            ),
            (
                self.quantization in QUANTIZATION_MODES,
                f"quantization={self.quantization!r} must be one of {QUANTIZATION_MODES}",
            ),
            (self.dtype in DTYPES, f"dtype={self.dtype!r} must be one of {DTYPES}"),
            (self.grad_accum_steps >= 1, "grad-accum-steps must be >= 1"),
            (
                self.grad_accum_steps == 1 or self.method not in ("kdfed", "split"),
                f"grad-accum-steps={self.grad_accum_steps} is not supported with "
                f"method={self.method} (one batch per client step); use 1",
            ),
        ]
        for ok, message in checks + self._alignment_checks():
            if not ok:
                raise ConfigError(f"run-config {message}")
        try:
            parse_tasks(self.eval_tasks, self.task)
        except ValueError as error:
            raise ConfigError(f"run-config eval-tasks={self.eval_tasks!r}: {error}") from None

    def _alignment_checks(self) -> list[tuple[bool, str]]:
        """DPO stages, per-client adapter depth and client-level DP."""
        stage = self.resolved_stage
        dp = self.dp_clipping_norm > 0
        return [
            (self.stage in STAGES, f"stage={self.stage!r} must be one of {STAGES}"),
            (self.dpo_beta > 0, "dpo-beta must be > 0"),
            (
                self.dpo_reference in DPO_REFERENCES,
                f"dpo-reference={self.dpo_reference!r} must be one of {DPO_REFERENCES}",
            ),
            (
                stage != "sft+dpo" or 1 <= self.dpo_rounds < self.num_server_rounds,
                f"dpo-rounds={self.dpo_rounds} must be in [1, num-server-rounds) with "
                "stage sft+dpo (some SFT rounds, then DPO rounds)",
            ),
            (self.preference_eval_pairs >= 0, "preference-eval-pairs must be >= 0"),
            (
                re.fullmatch(r"all|\d+(,\d+)*", self.preference_clients.replace(" ", ""))
                is not None,
                f"preference-clients={self.preference_clients!r} must be 'all' or partition "
                "ids like '0,2'",
            ),
            (
                self.method != "fedbialign" or bool(self.depth_table),
                "method=fedbialign needs depth-table, e.g. depth-table='1,2'",
            ),
            (
                not self.depth_table or self.method == "fedbialign",
                "depth-table is for method=fedbialign (per-client adapter depth)",
            ),
            (
                self.method != "fedbialign" or self.algorithm == "fedavg",
                "method=fedbialign aggregates per block with FedAvg: use algorithm=fedavg",
            ),
            (self.update_history_rounds >= 1, "update-history-rounds must be >= 1"),
            (self.split_point >= 0, "split-point must be >= 0 (0: half of the blocks)"),
            (
                self.split_dtype in SPLIT_DTYPES,
                f"split-dtype={self.split_dtype!r} must be one of {SPLIT_DTYPES}",
            ),
            (self.kd_topk >= 1, "kd-topk must be >= 1"),
            (0.0 <= self.kd_weight <= 1.0, "kd-weight must be in [0, 1]"),
            (self.kd_temperature > 0, "kd-temperature must be > 0"),
            (self.kd_public_examples >= 1, "kd-public-examples must be >= 1"),
            (self.kd_distill_steps >= 0, "kd-distill-steps must be >= 0"),
            (self.dp_clipping_norm >= 0, "dp-clipping-norm must be >= 0 (0: off)"),
            (self.dp_noise_multiplier >= 0, "dp-noise-multiplier must be >= 0"),
            (0.0 < self.dp_delta < 1.0, "dp-delta must be in (0, 1)"),
            (
                not dp or self.max_update_norm_ratio == 0,
                "dp-clipping-norm > 0 needs max-update-norm-ratio=0 (clipping bounds every "
                "update; the median screen would let one client get another rejected)",
            ),
            (
                not dp or self.method != "local",
                "dp-clipping-norm > 0 needs a method that aggregates",
            ),
        ]

    def example_cap(self) -> int:
        """The most ``num-examples`` the server accepts from one reply: ``max-num-examples``,
        else no more examples than the task's training set holds (or its preference pairs,
        with DPO rounds): the bound an honest client can never exceed."""
        if self.max_num_examples:
            return self.max_num_examples
        cap = len(self.task_records())
        if "dpo" in self.resolved_stage:
            key = "run-config preference-data"
            pairs = load_preferences(self.preference_data, self.data_dir or None, key)
            cap = max(cap, len(pairs))
        return cap

    @property
    def columns(self) -> Columns:
        """The ``*-column`` keys: which columns of the task's data hold the record fields."""
        c = self
        return Columns(c.instruction_column, c.input_column, c.output_column, c.label_column)

    def task_records(self, split: str = "") -> list[dict[str, str]]:
        """The task's records of ``split`` (default: the ``split`` key) through the column
        mapping; errors name ``run-config task``."""
        data_dir, key = self.data_dir or None, "run-config task"
        split = split or self.split
        return load_records(self.task, split, data_dir, self.columns, key, self.subset)

    @property
    def resolved_eval_split(self) -> str:
        """``test`` or ``validation`` (``auto`` resolved by the task)."""
        if self.eval_split != "auto":
            return self.eval_split
        return "test" if self.task in TASKS_WITH_TEST_SPLIT else "validation"

    @property
    def resolved_stage(self) -> str:
        """``auto``: DPO after SFT for FedBiAlign, SFT for every other method."""
        if self.stage != "auto":
            return self.stage
        return "sft+dpo" if self.method == "fedbialign" else "sft"

    def stage_of(self, server_round: int) -> str:
        """``sft`` or ``dpo`` for round ``server_round`` (1-based)."""
        stage = self.resolved_stage
        if stage == "sft+dpo":
            return "dpo" if server_round > self.num_server_rounds - self.dpo_rounds else "sft"
        return stage

    def torch_device(self) -> torch.device:
        """``auto`` picks the GPU when there is one."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"run-config device={self.device!r} but CUDA is not available")
        return torch.device(self.device)

    def to_dict(self) -> dict[str, Any]:
        """Flower-style keys, for config.json."""
        return {self.key(k): v for k, v in dataclasses.asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
