"""FedBiAlign through `flwr run`: SFT then DPO, adapter depths chosen from memory budgets,
client-level DP, a client without preference data skipping the DPO round."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path

import pytest

from bench.alignment_table import summarise
from models.blocks import get_blocks
from models.depth_memory import GB
from models.layout import fedbiot_layout
from models.memory_estimate import Setup, depth_memory
from tests.flower_runtime import LocalFederation, tiny_run_config
from tests.tiny import tiny

# The clients' setting of the run below, as the run config gives it (dtype auto: float32 on
# a CPU; the default LoRA r=8 and FedBiOT's proximal term, prox-epsilon 0.01).
SETUP = Setup("tiny-llama", drop_rate=0.5, adapter_layers=2, dtype="float32", batch=2, seq=48)


def _estimated(setup: Setup, prox: bool) -> dict[int, float]:
    """The estimator's GB for depths 1 and 2 of ``setup`` on the tiny model."""
    model, _ = tiny("tiny-llama")
    layout = fedbiot_layout(len(get_blocks(model)), setup.adapter_layers, setup.drop_rate)
    rows = depth_memory(setup, model.config, layout, (1, 2), prox=prox)
    return {depth: row["total"] / GB for depth, row in rows.items()}


def test_fedbialign_mixed_depths_dp_and_selective_dpo(
    federation: LocalFederation, tmp_path: Path
) -> None:
    estimated = _estimated(SETUP, prox=True)
    assert estimated[1] < estimated[2]
    between = (estimated[1] + estimated[2]) / 2  # partition 0 fits depth 1 only
    budgets = [between, 1.0, 1.0]
    config = tiny_run_config(
        tmp_path,
        "align",
        method="fedbialign",
        num_partitions=3,
        min_train_nodes=3,
        num_server_rounds=2,
        dpo_rounds=1,
        depth_table="1,2",
        adapter_layers=2,
        memory_budgets=",".join(f"{p}:{gb}" for p, gb in enumerate(budgets)),
        preference_clients="0,1",
        preference_eval_pairs=4,
        dp_clipping_norm=1.0,
        dp_noise_multiplier=0.5,
        max_update_norm_ratio=0.0,
        eval_every=1,
    )
    rows = federation.run_to_end(config, supernodes=3)
    run_dir = tmp_path / "align"
    assert [r["round"] for r in rows] == [0, 1, 2]
    sft, dpo = rows[1], rows[2]
    # Depths from the budgets: one node at depth 1, two at depth 2.
    assert sft["clients_depth_1"] == 1 and sft["clients_depth_2"] == 2
    assert math.isfinite(sft["train_loss"]) and sft["clients_failed"] == 0
    # Round 2 is DPO; partition 2 has no preference pairs and skips it.
    assert dpo["clients_skipped"] == 1 and math.isfinite(dpo["dpo_loss"])
    # Client-level DP: epsilon reported after every round, growing.
    assert 0 < sft["dp_epsilon"] < dpo["dp_epsilon"] < math.inf
    # Each block is averaged and noised over its own participants: the deepest adapter block
    # is trained by the two depth-2 nodes only, so its noise std is the largest, sigma*C/2.
    assert sft["dp_noise_std"] == pytest.approx(0.5 * 1.0 / 2)
    # Held-out preference pairs before (last SFT round) and after DPO, for AdapEmu and AdapFu:
    # reported both times, and moved by the DPO round. Whether DPO moves them towards the
    # chosen answers is tested without DP noise in tests/test_dpo_e2e.py: here the noise
    # (sigma 0.5 on a four-pair task) can move the margin either way.
    for variant in ("adapemu", "adapfu"):
        key = f"eval_{variant}_pref"
        for name in ("reward_margin", "loss"):
            assert math.isfinite(sft[f"{key}_{name}"]) and math.isfinite(dpo[f"{key}_{name}"])
        assert dpo[f"{key}_reward_margin"] != sft[f"{key}_reward_margin"], variant
    history = [
        json.loads(line) for line in (run_dir / "update_history.jsonl").read_text().splitlines()
    ]
    depths = sorted(r["depth"] for r in history if r["round"] == 1)
    assert depths == [1, 2, 2]
    # The server's table is the estimator's output for the run's client setting (not a
    # measurement on its own model), and each node got the deepest depth whose entry fits
    # its budget.
    written = json.loads((run_dir / "depth_memory.json").read_text())
    assert written["settings"] == asdict(SETUP) | {"prox": True}
    table = {int(d): gb for d, gb in written["estimated_gb"].items()}
    assert table == pytest.approx(_estimated(SETUP, prox=True), rel=1e-9)
    deepest = [max(d for d, gb in table.items() if gb <= budget) for budget in budgets]
    assert sorted(deepest) == depths
    assert (run_dir / "adapfu" / "config.json").is_file()
    # bench/alignment_table.py reads "before" from the last SFT round, "after" from the last,
    # pairing the per-pair margins the server kept for both.
    summary = summarise(run_dir)
    assert (summary["dp_noise_multiplier"], summary["dp_epsilon"]) == (0.5, dpo["dp_epsilon"])
    assert summary["task_loss_adapfu"] == dpo["eval_adapfu_gsm8k_loss"]  # not the pairs' loss
    assert (summary["before_round"], summary["after_round"]) == (1, 2)
    for variant in ("adapemu", "adapfu"):
        key = f"eval_{variant}_pref_reward"
        numbers = summary[variant]
        assert numbers["pairs"] == 4
        for when, row in (("before", sft), ("after", dpo)):
            assert numbers[f"margin_{when}"] == pytest.approx(row[f"{key}_margin"], rel=1e-6)
            for end in ("", "_ci_low", "_ci_high"):
                assert numbers[f"accuracy_{when}{end}"] == row[f"{key}_accuracy{end}"]
        assert numbers["margin_gain"] == pytest.approx(
            dpo[f"{key}_margin"] - sft[f"{key}_margin"], abs=1e-6
        )
