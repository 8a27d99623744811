"""HumanEval: the program each generated sample stands for, run in the sandbox, scored with
the unbiased pass@k estimator."""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from server_app.evaluation.generation import chat_prompt, generate
from server_app.evaluation.passk import pass_at_k
from server_app.evaluation.sandbox import run_programs
from task_data.sources import default_data_dir
from task_data.validation import subset

ASK = "Complete this Python function. Reply with the whole function in a code block.\n\n"
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|$)", re.DOTALL | re.IGNORECASE)
_CODE_LINE = re.compile(r"^(?:def |async def |class |from |import |@)", re.MULTILINE)


def _defines(code: str, name: str) -> re.Match | None:
    """Where ``code`` defines function ``name`` at the top level."""
    return re.search(rf"^(?:async\s+)?def\s+{re.escape(name)}\s*\(", code, re.MULTILINE)


def completion_code(prompt: str, entry_point: str, generation: str) -> str:
    """The program a sample stands for: the first fenced block if the model wrote one, else
    the text. Code that restates the entry point's ``def`` replaces the prompt's function but
    keeps what precedes it in the prompt (imports, helpers the function or the tests call):
    models told to reply with the whole function often leave those out. Anything else
    continues the prompt (a body)."""
    fenced = _FENCE.search(generation)
    code = fenced.group(1) if fenced else generation
    if not _defines(code, entry_point):
        return prompt + code
    if not fenced:  # drop a sentence before unfenced code ("Here is the function:")
        code = code[_CODE_LINE.search(code).start() :]
    own = _defines(prompt, entry_point)
    context = prompt[: own.start()] if own else ""
    return f"{context}{code}"


def load_humaneval(data_dir: str | None = None) -> list[dict]:
    """The 164 HumanEval problems (``prompt``, ``test``, ``entry_point``, ...)."""
    root = Path(data_dir) if data_dir else default_data_dir()
    with gzip.open(root / "humaneval" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def humaneval_program(problem: dict, generation: str) -> str:
    """The whole program that decides a sample: the code, the tests, the check call."""
    code = completion_code(problem["prompt"], problem["entry_point"], generation)
    return f"{code}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def humaneval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    size: int,
    seed: int,
    samples: int = 1,
    ks: tuple[int, ...] = (1,),
    temperature: float = 0.8,
    max_new_tokens: int = 384,
    timeout: float = 10.0,
    data_dir: str | None = None,
    workers: int | None = None,
) -> dict[str, float]:
    """pass@k (unbiased estimator) over ``samples`` generations per problem; greedy for 1.
    ``workers`` programs run at a time (default: one per CPU)."""
    problems = subset(load_humaneval(data_dir), size, seed)
    prompts = [chat_prompt(tokenizer, ASK + p["prompt"]) for p in problems for _ in range(samples)]
    torch.manual_seed(seed)
    outputs = generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens,
        temperature=temperature if samples > 1 else 0.0,
        description="humaneval",
    )
    programs = [
        humaneval_program(problem, outputs[i * samples + j])
        for i, problem in enumerate(problems)
        for j in range(samples)
    ]
    results = run_programs(programs, workers or os.cpu_count() or 1, timeout=timeout)
    passed = [
        sum(r.passed for r in results[i * samples : (i + 1) * samples])
        for i in range(len(problems))
    ]
    result: dict[str, float] = {"problems": len(problems)}
    for k in ks:
        if k <= samples:
            result[f"pass@{k}"] = sum(pass_at_k(samples, c, k) for c in passed) / len(passed)
    return result
