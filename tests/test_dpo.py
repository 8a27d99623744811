"""Client DPO: sequence log-probs, the loss against trl's, one step's effect, and metrics."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from client_app.dpo_training import (
    dpo_loss,
    preference_metrics,
    reference_logps,
    sequence_logps,
    train_dpo,
)
from models.blocks import get_blocks
from models.lora import LoraModel, LoraSpec
from task_data import collate_pairs, load_preferences, tokenize_pair
from tests.tiny import tiny


def _pair_batch(tokenizer, start: int = 0, pairs: int = 2) -> dict[str, torch.Tensor]:
    picked = load_preferences("hh-rlhf")[start : start + pairs]
    examples = [tokenize_pair(tokenizer, p, 64) for p in picked]
    return collate_pairs(examples, tokenizer.pad_token_id)


def _lora(name: str = "tiny-llama") -> tuple[LoraModel, object]:
    model, tokenizer = tiny(name)
    n = len(get_blocks(model))
    lora = LoraModel(model, tuple(range(n)), range(n), LoraSpec(r=4, alpha=8, dropout=0.1))
    return lora, tokenizer


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_sequence_logps_sum_response_token_log_probs(name: str) -> None:
    model, tokenizer = tiny(name)
    model.eval()
    batch = _pair_batch(tokenizer)
    with torch.no_grad():
        ours = sequence_logps(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = F.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = batch["labels"][:, 1:]
    mask = targets != -100
    picked = logps.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = (picked * mask).sum(dim=1)
    assert ours.shape == (4,) and (ours < 0).all()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-4)


def test_dpo_loss_matches_trl(tmp_path: Path) -> None:
    """trl's loss lives inside DPOTrainer._compute_loss: run a real trainer on the same batch
    with random precomputed reference log-probs, and compare loss, log-probs and margins."""
    trl_model, tokenizer = tiny("tiny-llama")
    args = DPOConfig(
        output_dir=str(tmp_path),
        report_to="none",
        use_cpu=True,
        beta=0.3,
        precompute_ref_log_probs=True,
    )
    trainer = DPOTrainer(
        model=trl_model,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "q", "chosen": "a", "rejected": "b"}]),
        processing_class=tokenizer,
    )
    batch = _pair_batch(tokenizer, start=10, pairs=3)
    reference = -60 - 40 * torch.rand(6, generator=torch.Generator().manual_seed(0))
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_mask": (batch["labels"] != -100).long(),
        "ref_chosen_logps": reference[:3],
        "ref_rejected_logps": reference[3:],
    }
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, inputs)
    trl_metrics = trainer._metrics["train" if trainer.model.training else "eval"]

    model, _ = tiny("tiny-llama")
    model.eval()
    with torch.no_grad():
        logps = sequence_logps(model, batch)
    losses, margins = dpo_loss(logps, reference, beta=0.3)
    torch.testing.assert_close(losses.mean(), trl_loss, rtol=1e-5, atol=1e-5)
    assert trl_metrics["logps/chosen"][-1] == pytest.approx(logps[:3].mean().item(), rel=1e-5)
    assert trl_metrics["rewards/margins"][-1] == pytest.approx(margins.mean().item(), rel=1e-4)
    # Random reference log-probs: a non-trivial loss, on either side of log 2 per pair.
    assert not torch.allclose(losses, torch.full_like(losses, math.log(2)))

    random_policy = torch.randn(8, generator=torch.Generator().manual_seed(1)) * 5 - 50
    random_reference = torch.randn(8, generator=torch.Generator().manual_seed(2)) * 5 - 50
    losses, margins = dpo_loss(random_policy, random_reference, beta=0.1)
    delta = (random_policy[:4] - random_reference[:4]) - (random_policy[4:] - random_reference[4:])
    torch.testing.assert_close(losses, -F.logsigmoid(0.1 * delta))
    torch.testing.assert_close(margins, 0.1 * delta)


def _log_ratio_gap(lora: LoraModel, batch: dict, reference: torch.Tensor) -> torch.Tensor:
    """Per pair, log pi/pi_ref of the chosen answer minus that of the rejected one."""
    with torch.no_grad():
        lora.peft.eval()
        chosen, rejected = (sequence_logps(lora.peft, batch) - reference).chunk(2)
    return chosen - rejected


def test_one_dpo_step_prefers_chosen_and_touches_only_the_given_blocks() -> None:
    lora, tokenizer = _lora("tiny-gpt2")  # GPT-2 has dropout: the step must run without it
    batch = _pair_batch(tokenizer, pairs=4)
    (reference,) = reference_logps(lora, [batch])
    before = lora.state()
    trained = (5, 6)

    result = train_dpo(lora, trained, iter([batch]), steps=1, learning_rate=5e-3, beta=0.1)

    # The reference is the model as received, so the (only) step starts at policy == reference.
    assert result.loss == pytest.approx(math.log(2), abs=1e-5)
    assert result.margin == pytest.approx(0.0, abs=1e-5) and result.accuracy == 0.5
    assert result.tokens == int(batch["attention_mask"].sum()) and result.seconds > 0
    assert (_log_ratio_gap(lora, batch, reference) > 0).all()  # chosen gained on rejected
    after = lora.state()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.split(".")[1] in {"5", "6"} for name in changed)
    assert not any(p.requires_grad for p in lora.peft.parameters())


def test_preference_metrics_against_a_fixed_reference() -> None:
    lora, tokenizer = _lora()
    batches = [_pair_batch(tokenizer, start, pairs) for start, pairs in [(0, 2), (2, 2), (4, 1)]]
    reference = reference_logps(lora, batches)
    same = preference_metrics(lora, batches, reference, beta=0.1)
    assert same.margin == 0.0 and same.accuracy == 0.5 and same.pairs == 5
    assert same.loss == pytest.approx(math.log(2), abs=1e-6)

    result = train_dpo(lora, range(8), iter(batches), steps=3, learning_rate=5e-3)
    assert result.loss < math.log(2) and result.margin > 0
    trained = preference_metrics(lora, batches, reference, beta=0.1)
    assert trained.margin > 0 and trained.accuracy > 0.5 and trained.loss < math.log(2)
    with pytest.raises(ValueError, match="2 reference tensors for 3 batches"):
        preference_metrics(lora, batches, reference[:2])
    with pytest.raises(ValueError, match="do not match"):
        preference_metrics(lora, batches, reference[::-1])
