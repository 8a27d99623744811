"""Block extraction: exact equivalence at beta=0, generation with a KV cache, errors."""

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from federation.local_training import train_lora
from models.blocks import extract_blocks, get_blocks
from models.fedbiot_models import FedBiOTModels
from models.layout import fedbiot_layout
from models.lora import LoraSpec
from tests.tiny import TINY, chat_batch, tiny


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


def test_extraction_shares_the_kept_weights_and_lora_training_leaves_the_full_model() -> None:
    model, tokenizer = tiny("tiny-llama")
    full_ptrs = {p.data_ptr() for p in model.parameters()}
    layout = fedbiot_layout(len(get_blocks(model)), 2, 0.5)
    pair = FedBiOTModels(model, tokenizer, layout, LoraSpec(r=4, alpha=8, dropout=0.0))
    lora_ids = {id(p) for p in pair.compressed.params().values()}
    frozen = [p for p in pair.compressed.peft.parameters() if id(p) not in lora_ids]
    assert frozen and {p.data_ptr() for p in frozen} <= full_ptrs  # no second copy
    top = layout.adapter_blocks[-1]
    compressed_top = get_blocks(pair.compressed.peft.get_base_model())[-1]
    full_top = get_blocks(pair.full.peft.get_base_model())[top]
    assert compressed_top.mlp.up_proj.base_layer.weight is full_top.mlp.up_proj.base_layer.weight
    # Renumbering the compressed blocks' layer_idx left the full model's own numbering.
    assert full_top.self_attn.layer_idx == top
    before = {n: p.detach().clone() for n, p in pair.full.peft.named_parameters()}
    trained = pair.compressed.state()
    batch = chat_batch(tokenizer, n=2, length=16)
    train_lora(pair.compressed, layout.kept_blocks, iter([batch] * 3), 3, 1e-2)
    assert any(not torch.equal(trained[k], v) for k, v in pair.compressed.state().items())
    for name, p in pair.full.peft.named_parameters():
        assert torch.equal(p, before[name]), name


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
