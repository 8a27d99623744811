"""The block lists ``models/blocks.py`` claims beyond Llama and GPT-2: Mistral, Qwen2 (with
per-layer sliding/full attention), Gemma, GPT-NeoX and OPT, as tiny random models built from
their configs. Cutting blocks out must give exactly the model Hugging Face builds with those
blocks, generate with its KV cache, save and load like any model, and take LoRA on the
blocks asked for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPTNeoXConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    Qwen2Config,
)

from models.blocks import block_path, extract_blocks, get_blocks
from models.lora import LoraModel, LoraSpec

SIZES = {"vocab_size": 96, "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 4}
LLAMA_LIKE = {**SIZES, "intermediate_size": 64, "num_key_value_heads": 2}
CONFIGS: dict[str, tuple[PretrainedConfig, str]] = {
    "mistral": (MistralConfig(**LLAMA_LIKE, sliding_window=4), "model.layers"),
    # Layers 2 and 3 slide, 0 and 1 attend fully: the kept blocks must keep their own kind.
    "qwen2": (
        Qwen2Config(**LLAMA_LIKE, use_sliding_window=True, sliding_window=4, max_window_layers=2),
        "model.layers",
    ),
    "gemma": (GemmaConfig(**LLAMA_LIKE, head_dim=8), "model.layers"),
    "gpt_neox": (GPTNeoXConfig(**SIZES, intermediate_size=64), "gpt_neox.layers"),
    "opt": (
        OPTConfig(
            vocab_size=96,
            hidden_size=32,
            num_attention_heads=4,
            num_hidden_layers=4,
            ffn_dim=64,
            word_embed_proj_dim=32,
            max_position_embeddings=64,
        ),
        "model.decoder.layers",
    ),
}
KEEP = (0, 2, 3)


def _model(config: PretrainedConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cut_model_is_the_model_hugging_face_builds_from_those_blocks(
    name: str, tmp_path: Path
) -> None:
    config, path = CONFIGS[name]
    model = _model(config)
    assert block_path(model) == path and len(get_blocks(model)) == 4
    compressed = extract_blocks(model, KEEP)
    assert compressed.config.num_hidden_layers == len(KEEP)
    if name == "qwen2":
        kinds = model.config.layer_types
        assert compressed.config.layer_types == [kinds[i] for i in KEEP]
        assert kinds[0] != kinds[2]  # the cut really mixes the two kinds
    # Hugging Face's own three-block model, given blocks 0, 2, 3's weights.
    reference = _model(compressed.config)
    prefix = f"{path}."
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix):
            index, _, rest = key[len(prefix) :].partition(".")
            if int(index) not in KEEP:
                continue
            key = f"{prefix}{KEEP.index(int(index))}.{rest}"
        state[key] = value
    reference.load_state_dict(state)
    ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(compressed, ids), _logits(reference, ids))
    # The KV cache is addressed by the renumbered blocks.
    prompt = ids[:1, :6]
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = compressed.generate(prompt, use_cache=True, **kwargs)
        uncached = compressed.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    # Saved and loaded as any Hugging Face model.
    compressed.save_pretrained(tmp_path / name)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()
    torch.testing.assert_close(_logits(loaded, ids), _logits(compressed, ids))
    # LoRA goes on every projection of the blocks asked for, and only there.
    lora = LoraModel(compressed, KEEP, (3,), LoraSpec(r=2, alpha=4))
    assert lora.modules and {m.block for m in lora.modules.values()} == {3}
    lora.peft.train()
    lora.peft(input_ids=ids, labels=ids).loss.backward()
    trained = {n for n, p in lora.peft.named_parameters() if p.grad is not None}
    assert trained and all("lora_" in n and f"{path}.2." in n for n in trained), trained
