"""Batched generation: left padding, KV cache, greedy or sampled; quiet progress off a TTY."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from models.progress import progress
from task_data.formatting import prompt_ids


def chat_prompt(tokenizer: PreTrainedTokenizerBase, user: str) -> list[int]:
    """Token ids of a one-turn prompt, formatted exactly as in training (``prompt_ids``)."""
    return prompt_ids(tokenizer, {"instruction": user, "input": ""})


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    batch_size: int = 8,
    temperature: float = 0.0,
    description: str = "generating",
) -> list[str]:
    """Decode a continuation of every prompt (token ids); greedy when ``temperature`` is 0."""
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs: list[str] = []
    starts = range(0, len(prompts), batch_size)
    for start in progress(starts, description, total=len(starts)):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {}
        generated = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad,
            use_cache=True,
            do_sample=temperature > 0,
            **{k: v for k, v in sampling.items() if k != "do_sample"},
        )
        outputs += tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    return outputs
