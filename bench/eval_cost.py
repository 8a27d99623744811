"""What the held-out evaluation costs per text: the gold label's loss, and 77-way label ranking
by the one-forward trie scorer against the exact ranker (shared prefix cached once,
branch and bound level by level), for the base model and for trained models.

    python -m bench.eval_cost --texts 40 --model-dir results/fedbiot-sweep/runs/fedit/adapfu
    python -m bench.eval_cost --model tiny-llama --texts 4          # smoke test

Times are CPU seconds of this process with one torch thread (``time.process_time``), which
other work on the machine disturbs far less than wall time; the trie nodes each method ran
are exact counts. Both rankers must agree on every text (the ranker is exact); the bench
stops if they do not. Prints a table and writes ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("FEDBIOT_CACHE", str(REPO / ".cache" / "fedbiot"))

from models.label_ranking import LabelRanker, shared_prefix_length  # noqa: E402
from models.label_scores import LabelTrie, label_log_likelihoods, label_token_ids  # noqa: E402
from models.loading import load_model  # noqa: E402
from server_app.evaluation.heldout import score_records  # noqa: E402
from task_data import load_records  # noqa: E402
from task_data.formatting import prompt_ids  # noqa: E402
from task_data.sources import default_data_dir  # noqa: E402
from task_data.validation import heldout_test_indices  # noqa: E402


def measure(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    records: list[dict],
    labels: list[str],
    cut_offs: list[int],
) -> dict[str, object]:
    """Per-text CPU seconds and trie nodes of the three evaluations on ``records``; the
    ranker once per ``whole_below`` cut-off (the first is the one reported at the top)."""
    model.eval()
    prompts = [prompt_ids(tokenizer, r) for r in records]
    gold = [labels.index(r["label"]) for r in records]
    candidates = label_token_ids(tokenizer, labels)
    nodes = len(LabelTrie.build(tuple(map(tuple, candidates))).tokens)
    start = time.process_time()
    score_records(model, tokenizer, records, 128, batch_size=8)
    loss_s = (time.process_time() - start) / len(records)
    start = time.process_time()
    with torch.no_grad():
        full = [int(label_log_likelihoods(model, [p], candidates)[0].argmax()) for p in prompts]
    trie_s = (time.process_time() - start) / len(records)
    prefix = prompts[0][: shared_prefix_length(prompts)]
    by_cut_off: dict[str, dict[str, float]] = {}
    for cut_off in cut_offs:
        start = time.process_time()
        ranker = LabelRanker(model, candidates, prefix, whole_below=cut_off)
        ranked = [ranker.rank(p, g)[0] for p, g in zip(prompts, gold, strict=True)]
        seconds = (time.process_time() - start) / len(records)
        if ranked != full:
            raise SystemExit(f"the exact ranker (whole_below={cut_off}) disagrees with the trie")
        counts = ranker.counts
        by_cut_off[str(cut_off)] = {
            "ranker_s_per_text": seconds,
            "ranker_nodes_per_text": counts.nodes_run / counts.texts,
            "ranker_forwards_per_text": counts.forwards / counts.texts,
        }
    first = by_cut_off[str(cut_offs[0])]
    return {
        "texts": len(records),
        "accuracy": sum(p == g for p, g in zip(full, gold, strict=True)) / len(records),
        "loss_s_per_text": loss_s,
        "trie_s_per_text": trie_s,
        **first,
        "speedup": trie_s / first["ranker_s_per_text"],
        "trie_nodes_per_text": nodes,
        "prompt_tokens_per_text": sum(map(len, prompts)) / len(prompts),
        "ranker_prompt_tokens_per_text": sum(len(p) - len(prefix) for p in prompts) / len(prompts),
        "by_whole_below": by_cut_off,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="the base model")
    parser.add_argument("--model-dir", nargs="*", type=Path, default=[],
                        help="trained models (e.g. a run's adapfu/) to measure too")  # fmt: skip
    parser.add_argument("--texts", type=int, default=40)
    parser.add_argument("--whole-below", nargs="+", type=int, default=[48],
                        help="the ranker's cut-offs to measure, the first reported")  # fmt: skip
    parser.add_argument("--note", default="", help="what else ran on the machine, kept in the JSON")
    parser.add_argument("--json", type=Path, default=REPO / "docs" / "bench" / "eval_cost.json")
    args = parser.parse_args(argv)
    if min(args.whole_below) < 0:
        parser.error("--whole-below: cut-offs are node counts, 0 or more")
    args.whole_below = list(dict.fromkeys(args.whole_below))
    torch.set_num_threads(1)
    labels = json.loads((default_data_dir() / "banking77" / "categories.json").read_text())
    test = load_records("banking77", "test")
    records = [test[i] for i in heldout_test_indices(len(test), args.texts)]
    models = {"base": load_model(args.model)}
    for path in args.model_dir:
        models[str(path)] = (
            AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
            AutoTokenizer.from_pretrained(path),
        )
    results = {
        name: measure(m, t, records, labels, args.whole_below) for name, (m, t) in models.items()
    }
    print("| model | accuracy | loss s/text | trie s/text | ranker s/text | speed-up "
          "| trie nodes | ranker nodes | ranker forwards | prompt tokens run |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        print(
            f"| {name} | {r['accuracy']:.2f} | {r['loss_s_per_text']:.3f} "
            f"| {r['trie_s_per_text']:.3f} | {r['ranker_s_per_text']:.3f} | {r['speedup']:.1f}x "
            f"| {r['trie_nodes_per_text']} | {r['ranker_nodes_per_text']:.0f} "
            f"| {r['ranker_forwards_per_text']:.1f} "
            f"| {r['ranker_prompt_tokens_per_text']:.0f} of {r['prompt_tokens_per_text']:.0f} |"
        )
    if len(args.whole_below) > 1:
        print("\n| model | whole_below | ranker s/text | ranker nodes | ranker forwards |")
        print("| --- | --- | --- | --- | --- |")
        for name, r in results.items():
            for cut_off, c in r["by_whole_below"].items():
                print(f"| {name} | {cut_off} | {c['ranker_s_per_text']:.3f} "
                      f"| {c['ranker_nodes_per_text']:.0f} "
                      f"| {c['ranker_forwards_per_text']:.1f} |")  # fmt: skip
    given = sys.argv[1:] if argv is None else argv
    document = {"command": " ".join(["python -m bench.eval_cost", *given]),
                "threads": 1, "whole_below": args.whole_below, "note": args.note,
                "results": results}  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2, sort_keys=True))
    return document


if __name__ == "__main__":
    main()
