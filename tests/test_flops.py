"""Training FLOPs per token: backward stops at the lowest trainable block."""

from models.blocks import extract_blocks, get_blocks
from models.flops import training_flops_per_token
from models.layout import fedbiot_layout
from models.lora import LoraModel, LoraSpec
from tests.tiny import chat_batch, tiny


def test_adapter_on_top_costs_less_than_at_the_bottom_or_everywhere() -> None:
    model, tokenizer = tiny("tiny-llama")
    n = len(get_blocks(model))
    lora = LoraModel(model, tuple(range(n)), range(n), LoraSpec(r=4, alpha=8))
    batch = chat_batch(tokenizer)
    top = training_flops_per_token(lora, [n - 1], batch)
    bottom = training_flops_per_token(lora, [0], batch)
    everywhere = training_flops_per_token(lora, range(n), batch)
    assert top < bottom < everywhere
    # The gap between top and bottom is the activation backward of the n - 1 lower blocks.
    assert bottom - top > 0.05 * top
    assert not any(p.requires_grad for p in lora.peft.parameters())


def test_compressed_model_costs_fewer_flops_than_the_full_one() -> None:
    model, tokenizer = tiny("tiny-llama")
    layout = fedbiot_layout(len(get_blocks(model)), 2, 0.5)
    compressed = extract_blocks(model, layout.kept_blocks)
    small = LoraModel(compressed, layout.kept_blocks, layout.kept_blocks, LoraSpec(r=4, alpha=8))
    full = LoraModel(model, tuple(range(8)), range(8), LoraSpec(r=4, alpha=8))
    batch = chat_batch(tokenizer)
    assert training_flops_per_token(small, layout.adapter_blocks, batch) < (
        training_flops_per_token(full, layout.adapter_blocks, batch)
    )
