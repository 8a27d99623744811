"""Model cards (``README.md`` with Hugging Face front matter) for the exported models, and the
exports that carry them: ``adapfu/``, ``adapemu/`` at the end, ``peft_<round>/`` per round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from federation.run_config import RunConfig
from models.export import AdapterFiles, export_outputs, export_round_adapter
from models.fedbiot_models import FedBiOTModels
from models.loading import base_model_id
from server_app.results import RunRecorder
from server_app.superlink_guard import check_superlink

# Hub ids of the shipped data sets (data/README.md names their sources).
HUB_DATASETS = {
    "gsm8k": "openai/gsm8k",
    "banking77": "PolyAI/banking77",
    "gpteacher": "teknium/GPTeacher-General-Instruct",
    "code-alpaca": "sahil2801/CodeAlpaca-20k",
    "hh-rlhf": "Anthropic/hh-rlhf",
}
_CI = ("_ci_low", "_ci_high")


def _hub_dataset(name: str) -> str | None:
    if name in HUB_DATASETS:
        return HUB_DATASETS[name]
    owner, slash, rest = name.partition("/")
    plain = slash and owner and rest and "/" not in rest and not Path(name).exists()
    return name if plain else None


def _metrics(variant: str, row: dict[str, Any]) -> list[str]:
    """Table lines of the variant's and the base's held-out metrics in ``row``, with the
    interval of each where the row has its ``_ci_low``/``_ci_high`` keys."""
    lines = []
    for key in sorted(row):
        if not key.startswith((f"eval_{variant}_", "eval_base_")) or key.endswith(_CI):
            continue
        value, low, high = row[key], row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
        interval = f"[{low:.4g}, {high:.4g}]" if low is not None and high is not None else ""
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"| `{key}` | {shown} | {interval} |")
    return lines


def model_card(
    config: RunConfig, variant: str, rows: list[dict[str, Any]], server_round: int
) -> str:
    """The card of ``variant`` (``adapfu``/``adapemu``) after ``server_round``; metrics from
    that round's ``metrics.jsonl`` row, when it has held-out ones."""
    base = base_model_id(config.model)
    datasets = [d for d in (_hub_dataset(config.task),) if d]
    if variant == "adapemu" and (public := _hub_dataset(config.public_data)):
        datasets.append(public)
    front = {
        "base_model": base,
        "library_name": "peft",
        "pipeline_tag": "text-generation",
        "tags": ["federated-learning", "flower", config.method, variant, "lora"],
        **({"datasets": sorted(set(datasets))} if datasets else {}),
    }
    what = {
        "adapfu": f"AdapFu: the trained adapter plugged into the full model `{base}`.",
        "adapemu": (
            "AdapEmu: the trained adapter on the compressed emulator, not on the full model. "
            f"Its base is the emulator in `base/` (built from `{base}` with blocks dropped, "
            "then distilled); the adapter loads onto that folder, not onto the base model."
        ),
    }[variant]
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {config.method} {variant}, round {server_round}",
        "",
        what,
        "",
        f"- method: `{config.method}` (aggregation `{config.algorithm}`), trained with Flower",
        f"- base model: `{base}`",
        f"- data: task `{config.task}`, partitioner `{config.partitioner}`, "
        f"{config.num_partitions} clients",
        f"- rounds: {server_round} of {config.num_server_rounds}; {config.local_steps} local "
        f"steps per round, batch {config.batch_size}, learning rate {config.learning_rate:g}",
        f"- LoRA: r={config.lora_r}, alpha={config.lora_alpha}",
    ]
    row = next((r for r in reversed(rows) if r.get("round") == server_round), {})
    table = _metrics(variant, row)
    if table:
        lines += [
            "",
            "## Held-out metrics",
            "",
            "| metric | value | 95% CI |",
            "| --- | --- | --- |",
        ]
        lines += table
    return "\n".join(lines) + "\n"


def _files(
    config: RunConfig, variants: tuple[str, ...], rows: list, server_round: int
) -> AdapterFiles:
    cards = {v: model_card(config, v, rows, server_round) for v in variants}
    return AdapterFiles(base_model=base_model_id(config.model), cards=cards)


def export_with_cards(
    models: FedBiOTModels, config: RunConfig, recorder: RunRecorder
) -> dict[str, Path]:
    """``adapfu/`` and ``adapemu/`` with their cards; the base named by its hub id."""
    check_superlink()
    last = recorder.rows[-1]["round"] if recorder.rows else config.num_server_rounds
    files = _files(config, ("adapfu", "adapemu"), recorder.rows, last)
    return export_outputs(models, recorder.dir, files)


def save_round_adapter(
    models: FedBiOTModels, config: RunConfig, recorder: RunRecorder, server_round: int
) -> Path | None:
    """``peft_<round>/`` on the rounds ``save-every-round`` asks for (and the last)."""
    every = config.save_every_round
    last = server_round == config.num_server_rounds
    if not every or not server_round or not (server_round % every == 0 or last):
        return None
    check_superlink()
    files = _files(config, ("adapfu",), recorder.rows, server_round)
    return export_round_adapter(models, recorder.dir, server_round, files)
