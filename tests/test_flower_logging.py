"""Messages of the lower layers go through Flower's logger, the one `flwr run --stream`
shows: a stdlib logger of our own has no handler there, and its messages were lost."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.loading import smollm2_dir
from task_data.preferences import load_preferences
from tests.test_aggregation import caplog_records


def test_skipped_preference_rows_are_logged_through_flower(tmp_path: Path) -> None:
    rows = [
        {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."},
        {"prompt": "Same?", "chosen": "Yes.", "rejected": "Yes."},  # identical answers
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog_records() as records:
        assert len(load_preferences(str(path))) == 1
    assert any(f"{path}: 1 pairs, skipped" in r for r in records), records


def test_the_embedded_model_conversion_is_logged_through_flower(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Converts the embedded GGUF into an empty cache (the default model's first run)."""
    monkeypatch.setenv("FEDBIOT_CACHE", str(tmp_path))
    with caplog_records() as records:
        converted = smollm2_dir()
    assert any("Converting the embedded SmolLM2-135M-Instruct GGUF" in r for r in records)
    # The converted model is the instruct model: dequantized weights, tied head, chat template.
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    tokenizer = AutoTokenizer.from_pretrained(converted)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(question, add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    with torch.no_grad():
        answer = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, ids.shape[1] :])
