"""Summarise alignment runs: held-out reward accuracy before and after DPO, task loss, ε.

    python -m bench.alignment_table results/align-nodp results/align-dp-s0.1 results/align-dp-s1.0

"Before" is the last SFT round (the SFT-only model), "after" the last round. Prints a
Markdown table and writes the same numbers as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.run_files import metrics_rows, run_config


def summarise(run: Path) -> dict[str, Any]:
    """The numbers of one run folder."""
    config = run_config(run)
    rows = metrics_rows(run)
    last = rows[-1]
    dpo_rounds = config["dpo-rounds"] if config["stage"] in ("auto", "sft+dpo") else 0
    before = next(r for r in rows if r["round"] == config["num-server-rounds"] - dpo_rounds)
    task_loss = next(
        k
        for k in last
        if k.startswith("eval_adapfu_") and k.endswith("_loss") and not k.endswith("_pref_loss")
    )
    out: dict[str, Any] = {
        "run": run.name,
        "dp_noise_multiplier": config["dp-noise-multiplier"] if config["dp-clipping-norm"] else 0,
        "dp_clipping_norm": config["dp-clipping-norm"],
        "dp_epsilon": last.get("dp_epsilon"),
        "task_loss_adapfu": last[task_loss],
    }
    for variant in ("adapemu", "adapfu"):
        key = f"eval_{variant}_pref_reward_accuracy"
        out[f"{variant}_accuracy_before"] = before.get(key)
        out[f"{variant}_accuracy_after"] = last.get(key)
        margin = f"eval_{variant}_pref_reward_margin"
        out[f"{variant}_margin_before"] = before.get(margin)
        out[f"{variant}_margin_after"] = last.get(margin)
    return out


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    table = [summarise(run) for run in args.runs]
    columns = list(table[0])
    print("| " + " | ".join(columns) + " |")
    print("| " + " | ".join("---" for _ in columns) + " |")
    for row in table:
        print("| " + " | ".join(_cell(row[c]) for c in columns) + " |")
    if args.json:
        args.json.write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
