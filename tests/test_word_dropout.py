"""WordDropout: nn.Dropout's distribution and gradient from a quarter of the random draws."""

import pytest
import torch

from models.blocks import get_blocks
from models.lora import LoraModel, LoraSpec
from models.word_dropout import WordDropout
from tests.tiny import tiny


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_every_lane_drops_at_rate_p_and_the_mean_is_kept(p: float) -> None:
    torch.manual_seed(0)
    dropout = WordDropout(p).train()
    out = dropout(torch.ones(400_000))
    dropped = out == 0
    # Each 64-bit word feeds four entries; a lane with a constant bit would drop 0 or 2p.
    for lane in range(4):
        assert dropped[lane::4].float().mean().item() == pytest.approx(p, abs=0.004)
    assert out.mean().item() == pytest.approx(1.0, abs=0.01)
    kept = torch.full_like(out, 1 / (1 - p))
    assert torch.all(dropped | torch.isclose(out, kept, rtol=1e-4))


def test_gradient_is_the_mask_times_the_scale_and_the_seed_fixes_the_mask() -> None:
    x = torch.randn(3, 5, 64, requires_grad=True)
    dropout = WordDropout(0.2).train()
    torch.manual_seed(7)
    out = dropout(x)
    out.sum().backward()
    kept = out != 0
    torch.testing.assert_close(x.grad, kept.float() * dropout.scale)
    torch.testing.assert_close(out, torch.where(kept, x * dropout.scale, 0.0))
    torch.manual_seed(7)
    torch.testing.assert_close(dropout(x), out)
    assert torch.equal(dropout.eval()(x), x)


def test_lora_model_uses_it_before_lora_a() -> None:
    model, _ = tiny("tiny-llama")
    blocks = tuple(range(len(get_blocks(model))))
    lora = LoraModel(model, blocks, [1], LoraSpec(dropout=0.1))
    layers = [m.layer for m in lora.modules.values()]
    assert layers and all(isinstance(m.lora_dropout["default"], WordDropout) for m in layers)
    no_dropout = LoraModel(tiny("tiny-llama")[0], blocks, [1], LoraSpec(dropout=0.0))
    layer = next(iter(no_dropout.modules.values())).layer
    assert isinstance(layer.lora_dropout["default"], torch.nn.Identity)
    with pytest.raises(ValueError, match="dropout probability"):
        WordDropout(1.0)
