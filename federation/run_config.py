"""The run configuration: every knob of `[tool.flwr.app.config]`, typed and validated.

Server and clients read the same keys, so both parse with ``RunConfig.from_flower``. Bad
values fail here with the key's name, before any model is loaded.

Importing this module loads neither torch nor the data libraries: a SuperNode reads the run
config for every message, and for the model offer and the run's release (which load no
model) that import would cost seconds of its start-up. The methods that need them import
them where they run.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from federation.run_checks import alignment_checks, value_checks
from federation.run_choices import TASKS_WITH_TEST_SPLIT, parse_tasks

if TYPE_CHECKING:
    import torch

    from task_data import Columns


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
    distill_hidden_norm: str = "relative"
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
    fidelity_examples: int = 64
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
        for ok, message in value_checks(self) + alignment_checks(self):
            if not ok:
                raise ConfigError(f"run-config {message}")
        try:
            parse_tasks(self.eval_tasks, self.task)
        except ValueError as error:
            raise ConfigError(f"run-config eval-tasks={self.eval_tasks!r}: {error}") from None

    def example_cap(self) -> int:
        """The most ``num-examples`` the server accepts from one reply: ``max-num-examples``,
        else no more examples than the task's training set holds (or its preference pairs,
        with DPO rounds): the bound an honest client can never exceed."""
        if self.max_num_examples:
            return self.max_num_examples
        cap = len(self.task_records())
        if "dpo" in self.resolved_stage:
            from task_data import load_preferences

            key = "run-config preference-data"
            pairs = load_preferences(self.preference_data, self.data_dir or None, key)
            cap = max(cap, len(pairs))
        return cap

    @property
    def columns(self) -> Columns:
        """The ``*-column`` keys: which columns of the task's data hold the record fields."""
        from task_data import Columns

        c = self
        return Columns(c.instruction_column, c.input_column, c.output_column, c.label_column)

    def task_records(self, split: str = "") -> list[dict[str, str]]:
        """The task's records of ``split`` (default: the ``split`` key) through the column
        mapping; errors name ``run-config task``."""
        from task_data import load_records

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
        import torch

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


def run_config_arg(values: dict[str, Any]) -> str:
    """``values`` as one ``flwr run --run-config`` string, parsed back to the same values.

    Flower splits that string with a regular expression in which a quoted value ends at the
    first matching quote and a double-quoted one is a TOML string with escapes
    (``flwr.common.config.parse_config_args``): a string holding both quote kinds, a backslash
    next to a single quote, or a line break cannot travel this way, and is refused naming its
    key instead of turning into another value or a parse error far from here."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = str(value).lower()
        elif isinstance(value, int | float):
            text = repr(value)
        elif not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: only strings, numbers and booleans")
        elif "\n" in value or "\r" in value:
            raise ConfigError(f"{key}={value!r}: a line break cannot be passed in --run-config")
        elif "'" not in value:
            text = f"'{value}'"
        elif '"' not in value and "\\" not in value:
            text = f'"{value}"'
        else:
            raise ConfigError(
                f"{key}={value!r}: a string with both quote kinds (or a quote and a backslash) "
                "cannot be passed in --run-config; put it in a TOML file"
            )
        parts.append(f"{key}={text}")
    return " ".join(parts)
