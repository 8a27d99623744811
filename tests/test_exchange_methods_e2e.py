"""KD-FedLLM and split learning end to end: `flwr run` on the session's real SuperLink.

Short runs on the tiny Llama-style model with two simulated SuperNodes. Each checks that the
run finishes with its round rows and outputs, and that the bytes are what the method sends:
soft labels and never parameters for KD, activations and their gradients every step (plus
the client LoRA at round ends) for split learning.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from bench.claims_report import model_table
from federation.kd_public import public_set
from federation.run_config import RunConfig
from tests.flower_runtime import LocalFederation, tiny_run_config
from tests.tiny import tiny

pytestmark = pytest.mark.xdist_group("exchange-methods")
CLIENTS = 2
NUM_LABELS = 77  # Banking77 intents
HIDDEN = 64  # tiny models' hidden size


def _run(federation: LocalFederation, config: dict) -> tuple[Path, list[dict]]:
    rows = federation.run_to_end(config, supernodes=CLIENTS)
    return Path(str(config["output-dir"])) / str(config["run-name"]), rows


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_rounds(
    run_dir: Path, rows: list[dict], rounds: int, task: str, learns: bool = True
) -> None:
    """``learns``: the run is long enough to lower the held-out loss of the tiny model."""
    assert [r["round"] for r in rows] == list(range(rounds + 1))
    for row in rows[1:]:
        assert math.isfinite(row["train_loss"]) and row["clients_sampled"] == CLIENTS
        assert row["clients_failed"] == 0
    # Held-out scores on the last (due) round, paired with the untrained model's.
    last = rows[-1]
    assert math.isfinite(last[f"eval_adapfu_{task}_loss"])
    base = next(r[f"eval_base_{task}_loss"] for r in rows if f"eval_base_{task}_loss" in r)
    assert last[f"eval_adapfu_{task}_loss"] == pytest.approx(
        base + last[f"eval_adapfu_{task}_loss_vs_base"]
    )
    if learns:
        assert last[f"eval_adapfu_{task}_loss_vs_base"] < 0.0
    else:
        assert last[f"eval_adapfu_{task}_loss_vs_base"] != 0.0  # the model moved
    assert (run_dir / "adapfu" / "peft" / "adapter_config.json").is_file()
    with open(run_dir / "communication.csv") as f:
        per_node = list(csv.DictReader(f))
    for row in rows[1:]:
        nodes = [n for n in per_node if int(n["round"]) == row["round"]]
        assert len(nodes) == CLIENTS
        assert sum(int(n["bytes_up"]) for n in nodes) == row["bytes_up"]
        assert sum(int(n["bytes_down"]) for n in nodes) == row["bytes_down"]
    # The frozen weights went to each node once, in round 1.
    assert rows[1]["bytes_model_download"] > 0
    assert all(r["bytes_model_download"] == 0 for r in rows[2:])


@pytest.mark.parametrize(
    ("task", "rounds"), [("banking77", 2), ("gsm8k", 1)], ids=["labels", "topk"]
)
def test_kdfed_sends_soft_labels_and_never_parameters(
    federation: LocalFederation, tmp_path: Path, task: str, rounds: int
) -> None:
    config = tiny_run_config(
        tmp_path,
        "kd",
        method="kdfed",
        task=task,
        num_server_rounds=rounds,
        kd_public_examples=4,
        kd_topk=3,
        kd_distill_steps=1,
        # Banking77: accuracy by label ranking, after the last round only (no round-0 base).
        eval_every=0 if task == "banking77" else rounds,
        banking77_eval="rank",
    )
    run_dir, rows = _run(federation, config)
    # One top-k distillation step on four public texts moves GSM8K loss either way.
    _check_rounds(run_dir, rows, rounds, task, learns=task == "banking77")
    _, tokenizer = tiny("tiny-llama")
    public = public_set(RunConfig.from_flower(config), tokenizer)
    if task == "banking77":  # dense label log-probs in fp16
        shape, per_client = [4, NUM_LABELS], 4 * NUM_LABELS * 2
        # The accuracy is that of the per-text rankings the run kept for paired tests.
        scored = [r for r in _jsonl(run_dir / "heldout.jsonl") if r["variant"] == "adapfu"]
        right = [p == g for p, g in zip(scored[-1]["predicted"], scored[-1]["gold"], strict=True)]
        assert rows[-1]["eval_adapfu_banking77_accuracy"] == sum(right) / len(right)
        assert not any("accuracy" in key for row in rows[:-1] for key in row)
        # The claims table's costs for this run: the server's seconds are its distillation
        # on the clients' soft labels (KD has no aggregation or emulator), the bytes per
        # client both ways plus the model download, the client seconds per example.
        table = model_table({("kdfed", "iid"): [run_dir]}, {run_dir.name: 9.0}, CLIENTS)
        (entry,) = [e for e in table if e["method"] == "kdfed"]
        trained = rows[1:]
        assert all(r["time_server_s"] > 0 for r in trained)
        assert entry["server_seconds"] == pytest.approx(sum(r["time_server_s"] for r in trained))
        moved = sum(r["bytes_up"] + r["bytes_down"] + r["bytes_model_download"] for r in trained)
        assert entry["bytes_per_client"] == pytest.approx(moved / CLIENTS)
        examples = int(config["local-steps"]) * int(config["batch-size"])
        assert entry["client_seconds_per_example"] == pytest.approx(
            sum(r["train_seconds"] for r in trained) / len(trained) / examples
        )
        assert entry["wall_seconds"] == 9.0
    else:  # top-3 fp16 log-probs and int32 token ids per response position
        shape, per_client = [sum(public.rows), 3], sum(public.rows) * 3 * (2 + 4)
    for row in rows[1:]:
        assert row["payload_bytes_up"] == CLIENTS * per_client
        # Flower's count adds the NumPy header and the key of each array, nothing more.
        assert 0 < row["bytes_up"] - row["payload_bytes_up"] < CLIENTS * 2 * 200
        assert math.isfinite(row["distill_loss"])
    # Round 1 sends nothing down; later rounds the aggregated soft labels.
    assert rows[1]["payload_bytes_down"] == 0 and rows[1]["bytes_down"] == 0
    if rounds > 1:
        assert rows[2]["payload_bytes_down"] == CLIENTS * per_client
        assert rows[1]["kd_loss"] == 0 < rows[2]["kd_loss"]
    # Nothing but the soft labels went up: no parameter array.
    for entry in _jsonl(run_dir / "received_arrays.jsonl"):
        values = entry["arrays"]["soft-labels"]
        assert set(entry["arrays"]) == {"soft-labels"}
        assert values["values"] == [shape, "float16"]
        assert set(values) == ({"values"} if task == "banking77" else {"values", "indices"})
    assert not any("arrays" in e["arrays"] for e in _jsonl(run_dir / "sent_arrays.jsonl"))


def test_split_exchanges_activations_every_step_and_averages_client_lora(
    federation: LocalFederation, tmp_path: Path
) -> None:
    rounds, steps, k = 2, 3, 3
    config = tiny_run_config(
        tmp_path,
        "split",
        method="split",
        num_server_rounds=rounds,
        local_steps=steps,
        split_point=k,
        split_dtype="fp16",
        eval_every=rounds,
    )
    run_dir, rows = _run(federation, config)
    _check_rounds(run_dir, rows, rounds, "gsm8k")
    assert json.loads((run_dir / "config.json").read_text())["client_blocks"] == [0, 1, 2]
    with open(run_dir / "steps.csv") as f:
        step_rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    assert len(step_rows) == rounds * steps * CLIENTS
    for s in step_rows:
        b, t, h = int(s["batch"]), int(s["tokens"]), int(s["hidden"])
        assert h == HIDDEN and math.isfinite(s["loss"])
        # fp16 activations, uint8 attention mask, int32 labels; fp16 gradient back.
        assert s["activation_bytes_up"] == b * t * h * 2
        assert s["payload_up"] == b * t * h * 2 + b * t * (1 + 4)
        assert s["payload_down"] == b * t * h * 2
        assert s["payload_up"] < s["bytes_up"] and s["payload_down"] < s["bytes_down"]
    for row in rows[1:]:
        assert row["clients_averaged"] == CLIENTS
        mine = [s for s in step_rows if s["round"] == row["round"]]
        # Beyond the steps: the client LoRA, down at the round's start and up at its end.
        lora_up = row["bytes_up"] - sum(s["bytes_up"] for s in mine)
        lora_down = row["bytes_down"] - sum(s["bytes_down"] for s in mine)
        assert lora_up == lora_down > 0
    sent = _jsonl(run_dir / "sent_arrays.jsonl")
    base = [e for e in sent if "base" in e["arrays"]]
    # The nodes share one store (one host): one copy, holding no block at or above the cut.
    assert len(base) == 1 and rows[1]["bytes_model_download_sent"] > 0
    layers = {name.split(".")[2] for name in base[0]["arrays"]["base"] if ".layers." in name}
    assert layers == {"0", "1", "2"}
    # Each round starts every client from the same (averaged) client LoRA.
    starts = {}
    for entry in sent:
        if "arrays" in entry["arrays"]:
            digests = {v[2] for v in entry["arrays"]["arrays"].values()}
            starts.setdefault(entry["round"], set()).add(frozenset(digests))
    assert sorted(starts) == [1, 2] and all(len(s) == 1 for s in starts.values())
    assert starts[1] != starts[2]
    finals = [e for e in _jsonl(run_dir / "received_arrays.jsonl") if "arrays" in e["arrays"]]
    assert len(finals) == rounds * CLIENTS
    assert all(int(name.split(".")[1]) < k for e in finals for name in e["arrays"]["arrays"])
