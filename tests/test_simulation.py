"""End to end: `flwr run` on a real SuperLink with Flower's simulation engine, tiny models.

Checks that the run finishes, that AdapEmu and AdapFu load with transformers and generate,
and, from the audit of every array the server sent, that no client received a weight of a
dropped block and that the frozen weights went to each node once.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.blocks import block_path, get_blocks
from models.cache_dir import cache_root
from models.loading import load_model
from server_app.evaluate import main as evaluate_main
from server_app.report import write_report
from task_data import load_records
from task_data.validation import subset
from tests.flower_runtime import tiny_run_config

ROUNDS = 2
# The tests of this module share two runs: keep them on one test worker.
pytestmark = pytest.mark.xdist_group("simulation")


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(Array(np.ascontiguousarray(tensor.float().numpy())).data).hexdigest()


# GSM8K (generation metrics) on one model, Banking77 by label ranking on the other.
RUNS = [("tiny-llama", 3, "gsm8k"), ("tiny-gpt2", 2, "banking77")]


@pytest.fixture(scope="module", params=RUNS, ids=lambda p: p[0])
def finished_run(request, federation, tmp_path_factory) -> tuple[str, Path]:
    model, clients, task = request.param
    out = tmp_path_factory.mktemp("results")
    config = tiny_run_config(
        out,
        "e2e",
        model=model,
        task=task,
        banking77_eval="rank",
        num_partitions=clients,
        num_server_rounds=ROUNDS,
        seq_length=64,
        public_examples=16,
        eval_examples=4,
        eval_every=1,
        open_ended_examples=2,
        prealign_steps=3,
        distill_steps=2,
    )
    federation.run_to_end(config, supernodes=clients)
    return model, out / "e2e"


def test_run_finishes_with_metrics_for_every_round(finished_run) -> None:
    _, run_dir = finished_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    for row in rows[1:]:
        for key in ("train_loss", "distill_loss", "client_eval_loss"):
            assert math.isfinite(row[key]), key
        assert row["bytes_up"] > 0 and row["bytes_down"] > 0
        assert row["clients_failed"] == 0
    # Task metrics: the untuned base model once, AdapEmu and AdapFu every round.
    task = "gsm8k" if "eval_base_gsm8k_loss" in rows[0] else "banking77"
    ranked = "examples" if task == "gsm8k" else "accuracy_examples"
    assert f"eval_base_{task}_accuracy" in rows[0]
    assert all(f"eval_base_{task}_accuracy" not in r for r in rows[1:])
    for row in rows:
        assert row[f"eval_adapemu_{task}_{ranked}"] == row[f"eval_adapfu_{task}_{ranked}"] == 2
        accuracy = row[f"eval_adapfu_{task}_accuracy"]
        low, high = (row[f"eval_adapfu_{task}_accuracy_ci_{s}"] for s in ("low", "high"))
        assert low <= accuracy <= high and high - low > 0.3  # Wilson on 2 texts is wide
    csv_lines = (run_dir / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == len(rows) + 1 and csv_lines[0].startswith("round,")
    # Per-node bytes add up to the round totals.
    with open(run_dir / "communication.csv", newline="") as f:
        per_node = list(csv.DictReader(f))
    for row in rows:
        mine = [r for r in per_node if int(r["round"]) == row["round"]]
        for key in ("bytes_up", "bytes_down", "bytes_model_download", "bytes_model_download_sent"):
            assert sum(int(r[key]) for r in mine) == row.get(key, 0), key
    assert rows[1]["bytes_model_download"] > 0
    assert rows[2]["bytes_model_download"] == 0  # the frozen weights travel once
    config = json.loads((run_dir / "config.json").read_text())
    assert config["versions"]["flwr"] and config["run_config"]["num-server-rounds"] == ROUNDS
    assert config["adapter_blocks"] == [6, 7]


def test_outputs_load_with_transformers_and_generate(finished_run) -> None:
    _, run_dir = finished_run
    config = json.loads((run_dir / "config.json").read_text())
    depth = {
        "adapemu": len(config["adapter_blocks"]) + len(config["emulator_blocks"]),
        "adapfu": config["layout"]["num_blocks"],
    }
    for variant, blocks in depth.items():
        model = AutoModelForCausalLM.from_pretrained(run_dir / variant)
        tokenizer = AutoTokenizer.from_pretrained(run_dir / variant)
        assert len(get_blocks(model)) == blocks
        assert (run_dir / variant / "peft" / "adapter_config.json").is_file()
        prompt = tokenizer("What is 2 + 3?", return_tensors="pt")
        out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
        assert out.shape[1] == prompt["input_ids"].shape[1] + 5


def test_adapfu_keeps_the_full_emulator_exact_and_trains_the_adapter(finished_run) -> None:
    model_name, run_dir = finished_run
    original, _ = load_model(model_name)
    adapfu = AutoModelForCausalLM.from_pretrained(run_dir / "adapfu")
    config = json.loads((run_dir / "config.json").read_text())
    ours, theirs = get_blocks(adapfu), get_blocks(original)
    for i in range(config["layout"]["num_blocks"]):
        same = all(
            torch.equal(a, b)
            for a, b in zip(
                ours[i].state_dict().values(), theirs[i].state_dict().values(), strict=True
            )
        )
        assert same == (i not in config["adapter_blocks"]), f"block {i}"


def test_no_client_received_a_dropped_block_and_weights_went_once(finished_run) -> None:
    model_name, run_dir = finished_run
    original, _ = load_model(model_name)
    config = json.loads((run_dir / "config.json").read_text())
    dropped = config["layout"]["dropped_blocks"]
    assert dropped, "the test needs a layout that drops blocks"
    blocks = get_blocks(original)
    dropped_digests = {_digest(t) for i in dropped for t in blocks[i].state_dict().values()}
    # Tensors equal to a kept one (e.g. layer norms still at their all-ones init) are no leak.
    kept = [i for i in range(len(blocks)) if i not in dropped]
    public = {_digest(t) for i in kept for t in blocks[i].state_dict().values()}
    secret = dropped_digests - public
    assert len(secret) >= 4 * len(dropped)  # every projection of a dropped block is covered

    entries = [
        json.loads(line) for line in (run_dir / "sent_arrays.jsonl").read_text().splitlines()
    ]
    assert entries
    base_per_node: dict[int, int] = {}
    for entry in entries:
        for record, arrays in entry["arrays"].items():
            for key, (_, _, digest) in arrays.items():
                assert digest not in secret, (
                    f"{record}/{key} to node {entry['node']} is a dropped block"
                )
                if record in ("arrays", "emulator"):
                    assert key.startswith("blocks.") and key.endswith(("lora_A", "lora_B")), key
                    block = int(key.split(".")[1])
                    expected = "adapter_blocks" if record == "arrays" else "emulator_blocks"
                    assert block in config[expected], key
        if "base" in entry["arrays"]:
            base_per_node[entry["node"]] = base_per_node.get(entry["node"], 0) + 1
            # The frozen weights hold exactly the compressed model's blocks.
            positions = {
                int(k.split(".")[k.split(".").index(block_path(original).split(".")[-1]) + 1])
                for k in entry["arrays"]["base"]
                if f"{block_path(original)}." in k
            }
            assert len(positions) == len(config["adapter_blocks"]) + len(config["emulator_blocks"])
    # The simulated nodes share one store (one host): one of them got the weights, once.
    assert list(base_per_node.values()) == [1]


def test_report_renders_tables_and_plots_from_the_run(finished_run, tmp_path: Path) -> None:
    _, run_dir = finished_run
    task = json.loads((run_dir / "config.json").read_text())["run_config"]["task"]
    report = write_report([run_dir], tmp_path / "report")
    text = report.read_text()
    assert f"| e2e (fedbiot/fedavg) | adapfu | {task}_accuracy |" in text
    assert f"| e2e (fedbiot/fedavg) | adapemu | {task}_loss |" in text
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    total_up = sum(r["bytes_up"] for r in rows)
    assert f"{total_up:,}" in text  # the communication table sums the measured bytes
    for plot in ("losses.png", "accuracy.png", "bytes.png"):
        assert f"]({plot})" in text
        assert (tmp_path / "report" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_standalone_evaluator_scores_a_saved_output(finished_run, tmp_path: Path) -> None:
    _, run_dir = finished_run
    target = tmp_path / "eval.json"
    document = evaluate_main(
        [
            "--model",
            str(run_dir / "adapemu"),
            "--task",
            "gsm8k",
            "perplexity",
            "--size",
            "2",
            "--max-new-tokens",
            "4",
            "--json",
            str(target),
        ]
    )
    saved = json.loads(target.read_text())
    assert saved["results"] == document["results"]
    assert saved["results"]["gsm8k"]["examples"] == 2
    ppl = saved["results"]["perplexity"]
    assert ppl["perplexity"] == pytest.approx(math.exp(ppl["loss"]))
    assert saved["versions"]["transformers"]


def test_open_ended_answers_are_saved_side_by_side(finished_run) -> None:
    _, run_dir = finished_run
    rows = [json.loads(line) for line in (run_dir / "open_ended.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["text"] and {"base", "adapemu", "adapfu"} <= set(row)
    text = (run_dir / "open_ended.md").read_text()
    assert text.count("**adapfu**") == 2 and rows[0]["text"] in text


def test_heldout_scores_are_per_text_paired_and_summarised(finished_run) -> None:
    model_name, run_dir = finished_run
    if model_name != "tiny-gpt2":
        pytest.skip("the Banking77 run carries the ranking")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    texts = [json.loads(line) for line in (run_dir / "heldout.jsonl").read_text().splitlines()]
    assert [(t["round"], t["variant"]) for t in texts] == [
        (0, "base"), (0, "adapemu"), (0, "adapfu"),
        (1, "adapemu"), (1, "adapfu"), (2, "adapemu"), (2, "adapfu"),
    ]  # fmt: skip
    # The same fixed held-out texts every round, whatever the run's seed.
    expected = [r["label"] for r in subset(load_records("banking77", "test"), 4, 0)[:2]]
    assert all(t["gold"] == expected and len(t["nll"]) == 4 for t in texts)
    base = texts[0]
    base_loss = sum(base["nll"]) / sum(base["tokens"])
    # The base scores are kept for the next run of this model on these texts.
    cached = [json.loads(p.read_text()) for p in (cache_root() / "heldout").glob("*.json")]
    assert any(c["nll"] == base["nll"] and c["predicted"] == base["predicted"] for c in cached)
    assert rows[0]["eval_base_banking77_loss"] == pytest.approx(base_loss)
    for text in texts[3:]:
        row = rows[text["round"]]
        key = f"eval_{text['variant']}_banking77"
        loss = sum(text["nll"]) / sum(text["tokens"])
        assert row[f"{key}_loss"] == pytest.approx(loss)
        assert row[f"{key}_loss_vs_base"] == pytest.approx(loss - base_loss)
        right = sum(p == g for p, g in zip(text["predicted"], text["gold"], strict=True))
        assert row[f"{key}_accuracy"] == right / 2
    fidelity = {
        f"fidelity_{kind}_{m}{end}"
        for kind in ("task", "public")
        for m in ("kl", "top1")
        for end in ("", "_ci_low", "_ci_high")
    }
    assert all(fidelity <= row.keys() for row in rows)  # E∘A against E*∘A every due round
    summary = (run_dir / "heldout_summary.md").read_text()
    adapfu = next(line for line in summary.splitlines() if line.startswith("| adapfu "))
    assert f"{rows[-1]['eval_adapfu_banking77_loss']:.3f} [" in adapfu
