"""Open-ended prompts (the 80 Vicuna questions): generations side by side, for reading."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from server_app.evaluation.generation import chat_prompt
from task_data.sources import default_data_dir
from task_data.validation import subset


def load_questions(data_dir: str | None = None) -> list[dict]:
    """``question_id``, ``text`` and ``category`` of every shipped question."""
    root = Path(data_dir) if data_dir else default_data_dir()
    path = root / "gpt4_llm" / "vicuna_question_80.jsonl"
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row, dict) or not row.get("text"):
            raise ValueError(f"{path} line {number}: needs a non-empty 'text'")
        questions.append(row)
    return questions


def side_by_side(
    variants: dict[str, Callable[[list[list[int]]], list[str]]],
    tokenizer: PreTrainedTokenizerBase,
    size: int,
    seed: int,
    out_dir: Path,
    data_dir: str | None = None,
) -> Path:
    """Each variant's answers (``variants[name](prompts)``) to ``size`` questions, side by
    side in ``open_ended.jsonl`` and ``open_ended.md``."""
    questions = subset(load_questions(data_dir), size, seed)
    prompts = [chat_prompt(tokenizer, q["text"]) for q in questions]
    answers = {name: answer(prompts) for name, answer in variants.items()}
    rows = [{**q, **{name: answers[name][i] for name in variants}} for i, q in enumerate(questions)]
    (out_dir / "open_ended.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = ["# Open-ended prompts", ""]
    for row in rows:
        lines += [f"## {row['question_id']}. {row['text']}", ""]
        for name in variants:
            lines += [f"**{name}**", "", row[name].strip() or "(empty)", ""]
    target = out_dir / "open_ended.md"
    target.write_text("\n".join(lines))
    return target
