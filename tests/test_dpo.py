"""Client DPO: sequence log-probs, the loss against trl's, one step's effect, metrics, and
the fixed reference (client and server)."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from trl import DPOConfig, DPOTrainer

from client_app.dpo_training import train_dpo
from federation.messages import DPO_REFERENCE
from federation.preferences import dpo_loss, preference_metrics, reference_logps, sequence_logps
from federation.run_config import ConfigError, RunConfig
from models.blocks import get_blocks
from models.fedbiot_models import FedBiOTModels
from models.lora import LoraModel, LoraSpec
from models.wire import from_record, to_record
from server_app.checkpoint import load_checkpoint, restore, save_checkpoint
from strategies.fedbiot import FedBiOT
from task_data import collate_pairs, load_preferences, tokenize_pair
from tests.stand_in_grid import NodeDirectory
from tests.tiny import tiny, tiny_fedbiot_models


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


def test_a_fixed_reference_does_not_drift_over_two_dpo_rounds() -> None:
    lora, tokenizer = _lora()
    batch = _pair_batch(tokenizer, pairs=4)
    start = lora.state()  # the model at the start of DPO, as the server ships it
    (start_logps,) = reference_logps(lora, [batch])
    train_dpo(lora, (6, 7), iter([batch] * 2), 2, 5e-3, reference_state=start)  # round 1
    received = lora.state()  # what DPO round 2 receives
    gap = _log_ratio_gap(lora, batch, start_logps)
    assert (gap > 0).all()  # round 1 taught every pair: the received model is not the start

    # Round 2's first step is scored against the start of DPO, not against what it received.
    fixed = train_dpo(lora, (6, 7), iter([batch]), 1, 5e-3, reference_state=start)
    assert fixed.margin == pytest.approx(0.1 * gap.mean().item(), rel=1e-4, abs=1e-6)
    assert fixed.accuracy == 1.0
    lora.load_state(received)
    drifting = train_dpo(lora, (6, 7), iter([batch]), 1, 5e-3)
    assert drifting.margin == pytest.approx(0.0, abs=1e-6) and drifting.accuracy == 0.5

    # Scoring the reference puts the received LoRA back before any step.
    lora.load_state(received)
    train_dpo(lora, (6, 7), iter([]), 0, 5e-3, reference_state=start)
    after = lora.state()
    assert all(torch.equal(after[name], value) for name, value in received.items())
    partial = {k: v for k, v in start.items() if not k.startswith("blocks.0.")}
    with pytest.raises(ValueError, match="reference lacks LoRA parameters"):
        train_dpo(lora, (6, 7), iter([batch]), 1, 5e-3, reference_state=partial)


def _server_round(strategy: FedBiOT, server_round: int) -> tuple[ArrayRecord, list[Message]]:
    """Configure a round; both clients return the adapter moved by ``server_round / 100``."""
    x = to_record(strategy.models.adapter_state())
    messages = list(
        strategy.configure_train(server_round, x, ConfigRecord(), NodeDirectory((1, 2)))
    )
    replies = [
        Message(
            RecordDict(
                {
                    "arrays": ArrayRecord(
                        {k: Array(v.numpy() + server_round / 100) for k, v in x.items()}
                    ),
                    "metrics": MetricRecord({"train_loss": 1.0, "num-examples": 5}),
                }
            ),
            reply_to=message,
        )
        for message in messages
    ]
    strategy.aggregate_train(server_round, replies)
    return x, messages


def _fixed_strategy(models: FedBiOTModels) -> FedBiOT:
    return FedBiOT(
        models=models,
        distiller=None,
        distill_steps=0,
        stage=lambda r: "sft" if r == 1 else "dpo",
        fixed_dpo_reference=True,
        min_train_nodes=2,
        min_available_nodes=2,
    )


def test_the_server_ships_the_start_of_dpo_as_the_reference_across_rounds_and_resumes(
    tmp_path: Path,
) -> None:
    models = tiny_fedbiot_models()
    strategy = _fixed_strategy(models)
    _, sft = _server_round(strategy, 1)
    assert all(DPO_REFERENCE not in m.content for m in sft)
    start, first = _server_round(strategy, 2)  # the first DPO round: its model is the anchor
    _, second = _server_round(strategy, 3)
    expected = {**from_record(start), **models.emulator_state()}
    for message in first + second:
        shipped = from_record(message.content[DPO_REFERENCE])
        assert shipped.keys() == expected.keys()
        assert all(torch.equal(shipped[k], v) for k, v in expected.items())
    moved = from_record(second[0].content["arrays"])
    assert not any(torch.equal(moved[k], v) for k, v in from_record(start).items())

    save_checkpoint(tmp_path, 3, models, strategy, None)
    resumed = _fixed_strategy(models)
    resumed.round_offset = restore(
        load_checkpoint(tmp_path / "latest.pt")[0], models, resumed, None
    )
    _, fourth = _server_round(resumed, 1)
    shipped = from_record(fourth[0].content[DPO_REFERENCE])
    assert all(torch.equal(shipped[k], v) for k, v in expected.items())
    with pytest.raises(ConfigError, match="dpo-reference"):
        RunConfig.from_flower({"dpo-reference": "initial"})
