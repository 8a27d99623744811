"""Block extraction: exact equivalence at beta=0, generation with a KV cache, errors."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from models.blocks import extract_blocks, get_blocks
from models.fedbiot_models import FedBiOTModels
from models.layout import fedbiot_layout
from models.lora import LoraSpec
from tests.tiny import TINY, tiny


@pytest.mark.parametrize("name", TINY)
def test_no_drop_and_zero_lora_gives_the_original_logits(name: str) -> None:
    model, tokenizer = tiny(name)
    ids = torch.randint(5, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits.clone()
    layout = fedbiot_layout(len(get_blocks(model)), 2, 0.0)
    pair = FedBiOTModels(model, tokenizer, layout, LoraSpec())
    with torch.no_grad():
        # peft initialises B = 0, so LoRA adds nothing yet.
        compressed = pair.compressed.peft(ids).logits
        full = pair.full.peft(ids).logits
    torch.testing.assert_close(compressed, reference)
    torch.testing.assert_close(full, reference)


@pytest.mark.parametrize("name", TINY)
def test_compressed_model_generates_the_same_with_and_without_kv_cache(name: str) -> None:
    model, _ = tiny(name)
    layout = fedbiot_layout(len(get_blocks(model)), 2, 0.5)
    compressed = extract_blocks(model, layout.kept_blocks)
    assert len(get_blocks(compressed)) == len(layout.kept_blocks)
    assert compressed.config.num_hidden_layers == len(layout.kept_blocks)
    for position, block in enumerate(get_blocks(compressed)):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                assert module.layer_idx == position
    # The original keeps its own numbering and depth.
    assert model.config.num_hidden_layers == layout.num_blocks
    ids = torch.randint(5, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    cached = compressed.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    uncached = compressed.generate(
        ids, attention_mask=mask, max_new_tokens=6, do_sample=False, use_cache=False
    )
    assert torch.equal(cached, uncached)
    assert cached.shape == (1, 14)


def test_extraction_copies_only_the_kept_blocks() -> None:
    model, _ = tiny("tiny-llama")
    compressed = extract_blocks(model, (0, 7))
    kept = {p.data_ptr() for p in compressed.parameters()}
    assert not kept & {p.data_ptr() for p in model.parameters()}
    torch.testing.assert_close(
        get_blocks(compressed)[1].mlp.up_proj.weight, get_blocks(model)[7].mlp.up_proj.weight
    )


def test_unsupported_model_gets_a_clear_error() -> None:
    class NotADecoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(2, 2)])

    with pytest.raises(ValueError, match="unsupported model type 'NotADecoder'"):
        get_blocks(NotADecoder())


def test_bad_block_indices_are_rejected() -> None:
    model, _ = tiny("tiny-gpt2")
    with pytest.raises(ValueError, match="distinct, sorted"):
        extract_blocks(model, (3, 1))
    with pytest.raises(ValueError, match=r"in \[0, 8\)"):
        extract_blocks(model, (0, 8))


def test_saved_compressed_model_loads_with_transformers(tmp_path) -> None:
    model, _ = tiny("tiny-llama")
    compressed = extract_blocks(model, (0, 3, 6, 7))
    compressed.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.arange(5, 15).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, compressed(ids).logits)
