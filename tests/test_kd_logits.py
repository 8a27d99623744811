"""KD-FedLLM soft labels: top-k packing, example-weighted aggregation, KD loss, bytes."""

import math

import pytest
import torch

from models.kd_logits import (
    TopKTargets,
    aggregate_soft_labels,
    dense_pack,
    kd_loss,
    payload_bytes,
    topk_pack,
    topk_unpack,
)
from models.wire import from_record, to_record


def _logits_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=generator) * 2
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False  # padding positions are left out
    return logits, mask


def test_topk_with_k_equal_vocab_round_trips_exactly() -> None:
    logits, mask = _logits_and_mask()
    values, indices = topk_pack(logits, mask, k=7, dtype="fp32")
    assert values.shape == indices.shape == (8, 7) and indices.dtype == torch.int32
    targets = topk_unpack(values, indices)
    torch.testing.assert_close(targets.dense(7), logits.softmax(-1)[mask])
    torch.testing.assert_close(targets.rest, torch.zeros(8), atol=1e-6, rtol=0)


def test_topk_keeps_the_largest_probabilities_exactly_and_the_rest_in_a_bucket() -> None:
    logits, mask = _logits_and_mask()
    values, indices = topk_pack(logits, mask, k=3, dtype="fp32")
    probs = logits.softmax(-1)[mask]
    top, top_ids = probs.topk(3, dim=-1)
    assert torch.equal(indices.long(), top_ids)
    targets = topk_unpack(values, indices)
    torch.testing.assert_close(targets.probs, top)
    torch.testing.assert_close(targets.rest, 1 - top.sum(-1))
    # fp16 values: same tokens, probabilities to fp16 precision
    half, half_ids = topk_pack(logits, mask, k=3)
    assert half.dtype == torch.float16 and torch.equal(half_ids, indices)
    torch.testing.assert_close(topk_unpack(half, half_ids).probs, top, rtol=2e-3, atol=0)
    # temperature softens the distribution the payload carries
    soft, _ = topk_pack(logits, mask, k=3, temperature=2.0, dtype="fp32")
    expected = (logits / 2).softmax(-1)[mask].topk(3, dim=-1).values
    torch.testing.assert_close(soft.exp(), expected)


def test_payload_bytes_and_wire_round_trip() -> None:
    logits, mask = _logits_and_mask()
    values, indices = topk_pack(logits, mask, k=3)
    assert payload_bytes((values, indices)) == 8 * 3 * (2 + 4)
    assert payload_bytes(dense_pack(logits[0])) == 5 * 7 * 4
    back = from_record(to_record({"values": values, "indices": indices}))
    assert torch.equal(back["values"], values) and torch.equal(back["indices"], indices)


def test_dense_aggregation_is_the_example_weighted_mean_of_probabilities() -> None:
    a = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    b = torch.tensor([[0.1, 0.9], [0.2, 0.8]])
    # weights 1/4 and 3/4: row 0 -> .25*.5 + .75*.1 = .2, row 1 -> .25*1 + .75*.2 = .4
    expected = torch.tensor([[0.2, 0.8], [0.4, 0.6]])
    payloads = [(dense_pack(a.log()), 1), (dense_pack(b.log()), 3)]
    torch.testing.assert_close(aggregate_soft_labels(payloads).exp(), expected)


def test_topk_aggregation_takes_the_union_of_tokens_and_keeps_the_rest_explicit() -> None:
    # Client A (1 example): row 0 {0: .6, 1: .3}, row 1 {4: .7, 5: .2}
    # Client B (3 examples): row 0 {1: .5, 2: .4}, row 1 {4: .5, 3: .3}
    a = (torch.tensor([[0.6, 0.3], [0.7, 0.2]]).log(), torch.tensor([[0, 1], [4, 5]]))
    b = (torch.tensor([[0.5, 0.4], [0.5, 0.3]]).log(), torch.tensor([[1, 2], [4, 3]]))
    payloads = [((a[0], a[1].int()), 1), ((b[0], b[1].int()), 3)]
    # Row 0: 0 -> .25*.6 = .15, 1 -> .25*.3 + .75*.5 = .45, 2 -> .75*.4 = .30
    # Row 1: 4 -> .25*.7 + .75*.5 = .55, 3 -> .75*.3 = .225, 5 -> .25*.2 = .05
    values, indices = aggregate_soft_labels(payloads)  # width 2, the clients' k
    targets = topk_unpack(values, indices)
    assert indices.tolist() == [[1, 2], [4, 3]]
    torch.testing.assert_close(targets.probs, torch.tensor([[0.45, 0.30], [0.55, 0.225]]))
    torch.testing.assert_close(targets.rest, torch.tensor([0.25, 0.225]))

    values, indices = aggregate_soft_labels(payloads, k=3)
    assert indices.tolist() == [[1, 2, 0], [4, 3, 5]]
    torch.testing.assert_close(
        values.exp(), torch.tensor([[0.45, 0.30, 0.15], [0.55, 0.225, 0.05]])
    )
    with pytest.raises(ValueError, match="fewer than"):
        aggregate_soft_labels(payloads, k=4)
    with pytest.raises(ValueError, match="mix"):
        aggregate_soft_labels([(a[0], 1), (b, 1)])
    with pytest.raises(ValueError, match="different numbers"):
        aggregate_soft_labels([(a, 1), ((b[0][:1], b[1][:1]), 1)])


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("k", [3, 7, None])
def test_kd_loss_is_zero_for_the_teacher_itself_and_positive_otherwise(
    k: int | None, temperature: float
) -> None:
    logits, mask = _logits_and_mask()
    other = logits.flip(-1)
    targets: torch.Tensor | TopKTargets
    if k is None:  # classification: every valid position is one example of 7 classes
        targets = dense_pack(logits[mask], temperature)
        student, student_mask = logits[mask], None
        other = other[mask]
    else:
        targets = topk_unpack(*topk_pack(logits, mask, k, temperature, dtype="fp32"))
        student, student_mask = logits, mask
    same = kd_loss(student, targets, student_mask, temperature)
    torch.testing.assert_close(same, torch.tensor(0.0), atol=1e-5, rtol=0)
    different = other.clone().requires_grad_(True)
    loss = kd_loss(different, targets, student_mask, temperature)
    assert loss > 1e-2
    loss.backward()
    assert different.grad is not None and torch.isfinite(different.grad).all()


def test_topk_kd_loss_is_the_full_kl_at_k_equal_vocab_and_a_lower_bound_below() -> None:
    logits, mask = _logits_and_mask()
    student = logits.flip(-1) * 0.5
    teacher, s = logits.log_softmax(-1)[mask], student.log_softmax(-1)[mask]
    full = (teacher.exp() * (teacher - s)).sum(-1).mean()
    exact = kd_loss(student, topk_unpack(*topk_pack(logits, mask, 7, dtype="fp32")), mask)
    torch.testing.assert_close(exact, full)
    coarse = kd_loss(student, topk_unpack(*topk_pack(logits, mask, 2, dtype="fp32")), mask)
    assert 0 < coarse < full
    none = torch.zeros_like(mask)
    empty = kd_loss(student, topk_unpack(*topk_pack(logits, none, 2)), none)
    assert empty == 0 and not math.isnan(empty.item())
    with pytest.raises(ValueError, match="target rows"):
        kd_loss(student, topk_unpack(*topk_pack(logits, mask, 2)), none)
