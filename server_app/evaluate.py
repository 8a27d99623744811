"""Evaluate any saved output or Hugging Face model directory on the shipped tasks.

    python -m server_app.evaluate --model results/default/adapfu --task gsm8k --size 50
    python -m server_app.evaluate --model smollm2-135m --task banking77 --mode rank
    python -m server_app.evaluate --model results/x/adapemu --task humaneval --samples 5 --k 1 5

Prints a table and writes JSON (the settings, package versions and results).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from federation.run_choices import EVAL_TASKS
from models.loading import load_model
from server_app.evaluation.suite import EvalSettings, evaluate_tasks
from server_app.results import package_versions


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="directory, hub id, or smollm2-135m")
    parser.add_argument("--task", nargs="+", choices=EVAL_TASKS, required=True)
    parser.add_argument("--size", type=int, default=100, help="examples per task (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shots", type=int, default=0, help="GSM8K few-shot examples")
    parser.add_argument("--mode", choices=("generate", "rank"), default="generate")
    parser.add_argument("--samples", type=int, default=1, help="HumanEval samples per problem")
    parser.add_argument("--k", type=int, nargs="+", default=[1], help="HumanEval pass@k")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--perplexity-task", default="gsm8k")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None, help="default: <model dir>/eval.json or ./")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args.model)
    model.to(args.device)
    settings = EvalSettings(
        tasks=tuple(args.task),
        size=args.size,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
        perplexity_task=args.perplexity_task,
        banking77_mode=args.mode,
        gsm8k_shots=args.shots,
        humaneval_samples=args.samples,
        humaneval_ks=tuple(args.k),
        data_dir=args.data_dir,
    )
    start = time.perf_counter()
    results = evaluate_tasks(model, tokenizer, settings)
    print(f"{'task':<12} {'metric':<12} {'value':>10}")
    for task, metrics in results.items():
        for metric, value in metrics.items():
            print(f"{task:<12} {metric:<12} {value:>10.4f}")
    document = {
        "model": args.model,
        "settings": vars(args),
        "versions": package_versions(),
        "seconds": time.perf_counter() - start,
        "results": results,
    }
    model_dir = Path(args.model)
    target = (
        Path(args.json)
        if args.json
        else (model_dir / "eval.json" if model_dir.is_dir() else Path("eval.json"))
    )
    target.write_text(json.dumps(document, indent=2))
    print(f"wrote {target}")
    return document


if __name__ == "__main__":
    main()
