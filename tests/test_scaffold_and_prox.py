"""SCAFFOLD's control-variate algebra on a toy quadratic, FedProx's gradient, and the
cosine learning-rate schedule."""

from __future__ import annotations

import pytest
import torch

from federation.local_training import client_control_update, lora_proximal, train_lora
from federation.run_config import RunConfig
from models.blocks import get_blocks
from models.lora import LoraModel, LoraSpec
from models.response_logits import response_lm_loss
from server_app.exchange_loop import round_config
from strategies.lr_schedule import round_learning_rate
from strategies.scaffold import server_control_update
from tests.tiny import chat_batch, tiny

# Three clients with very different quadratics f_i(x) = 1/2 (x - b_i)^T A_i (x - b_i):
# local steps drift each client towards its own optimum b_i.
A = [torch.diag(torch.tensor(d)) for d in ([4.0, 0.2], [0.2, 4.0], [1.0, 1.0])]
B = [torch.tensor(b) for b in ([3.0, -1.0], [-2.0, 2.0], [0.5, 4.0])]
OPTIMUM = torch.linalg.solve(sum(A), sum(a @ b for a, b in zip(A, B, strict=True)))
STEPS, LR = 10, 0.2


def _grad(i: int, x: torch.Tensor) -> torch.Tensor:
    return A[i] @ (x - B[i])


def _local(i: int, x: torch.Tensor, c=None, c_i=None) -> torch.Tensor:
    """K plain SGD steps; with control variates, each followed by SCAFFOLD's correction
    step ``-LR * (c - c_i)`` (with SGD the same as correcting the gradient)."""
    y = x.clone()
    for _ in range(STEPS):
        y = y - LR * _grad(i, y)
        if c is not None:
            y = y - LR * (c - c_i)
    return y


def _fedavg(rounds: int) -> torch.Tensor:
    x = torch.zeros(2)
    for _ in range(rounds):
        x = sum(_local(i, x) for i in range(3)) / 3
    return x


def _scaffold(rounds: int) -> torch.Tensor:
    x = torch.zeros(2)
    c = {"x": torch.zeros(2)}
    c_i = [{"x": torch.zeros(2)} for _ in range(3)]
    for _ in range(rounds):
        ys, deltas = [], []
        for i in range(3):
            y = _local(i, x, c["x"], c_i[i]["x"])
            c_i[i], delta = client_control_update(c, c_i[i], {"x": x}, {"x": y}, STEPS, LR)
            ys.append(y)
            deltas.append(delta)
        x = sum(ys) / 3
        c = server_control_update(c, deltas, num_nodes=3)
    return x


def test_option_ii_control_variate_is_the_mean_local_gradient() -> None:
    x = torch.tensor([1.0, 1.0])
    c, c_i = {"x": torch.tensor([0.3, -0.2])}, {"x": torch.tensor([-0.1, 0.4])}
    y = _local(0, x, c["x"], c_i["x"])
    new, delta = client_control_update(c, c_i, {"x": x}, {"x": y}, STEPS, LR)
    # With SGD, (x - y) / (K lr) = mean_k(g_k - c_i + c), so c_i+ = mean_k g_k.
    grads = []
    z = x.clone()
    for _ in range(STEPS):
        g = _grad(0, z)
        grads.append(g)
        z = z - LR * (g - c_i["x"] + c["x"])
    torch.testing.assert_close(new["x"], torch.stack(grads).mean(0))
    torch.testing.assert_close(delta["x"], new["x"] - c_i["x"])


def test_server_control_variate_moves_by_sampled_share_of_the_mean_delta() -> None:
    c = {"x": torch.tensor([1.0, 2.0])}
    deltas = [{"x": torch.tensor([2.0, 0.0])}, {"x": torch.tensor([0.0, 4.0])}]
    # |S| = 2 sampled of N = 4: c + 2/4 * mean = c + sum / 4.
    new = server_control_update(c, deltas, num_nodes=4)
    torch.testing.assert_close(new["x"], torch.tensor([1.5, 3.0]))


def test_scaffold_ends_closer_to_the_global_optimum_than_fedavg() -> None:
    fedavg = torch.linalg.norm(_fedavg(30) - OPTIMUM)
    scaffold = torch.linalg.norm(_scaffold(30) - OPTIMUM)
    assert fedavg > 0.3  # client drift leaves FedAvg visibly off the optimum
    assert scaffold < 1e-3 < fedavg / 100


def _client_lora() -> tuple[LoraModel, list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """The tiny Llama with LoRA (no dropout), three batches and a SCAFFOLD correction
    ``c - c_i`` for the LoRA of its last two blocks."""
    model, tokenizer = tiny("tiny-llama")
    n = len(get_blocks(model))
    lora = LoraModel(model, tuple(range(n)), range(n), LoraSpec(r=4, alpha=8, dropout=0.0))
    batches = []
    for seed in range(3):
        batch = chat_batch(tokenizer)
        generator = torch.Generator().manual_seed(seed)
        batch["input_ids"] = torch.randint(5, 1000, batch["input_ids"].shape, generator=generator)
        batch["labels"] = torch.where(batch["labels"] == -100, -100, batch["input_ids"])
        batches.append(batch)
    generator = torch.Generator().manual_seed(7)
    correction = {
        k: 0.5 * torch.randn(p.shape, generator=generator)
        for k, p in lora.params(CLIENT_BLOCKS).items()
    }
    return lora, batches, correction


CLIENT_BLOCKS = (6, 7)
CLIENT_LR = 1e-2


def test_one_client_step_is_adamws_step_then_minus_lr_times_the_correction() -> None:
    lora, batches, correction = _client_lora()
    start = lora.state()
    train_lora(lora, CLIENT_BLOCKS, iter(batches), 1, CLIENT_LR)
    plain = lora.state(CLIENT_BLOCKS)
    lora.load_state(start)
    train_lora(lora, CLIENT_BLOCKS, iter(batches), 1, CLIENT_LR, correction=correction)
    corrected = lora.state(CLIENT_BLOCKS)
    for name, value in plain.items():
        torch.testing.assert_close(corrected[name], value - CLIENT_LR * correction[name])


def test_client_loop_with_correction_matches_a_hand_written_scaffold_adamw_loop() -> None:
    lora, batches, correction = _client_lora()
    start = lora.state()
    train_lora(lora, CLIENT_BLOCKS, iter(batches), 3, CLIENT_LR, correction=correction)
    got = lora.state(CLIENT_BLOCKS)
    # The same three steps written out: AdamW on the clipped gradient, then -lr (c - c_i).
    lora.load_state(start)
    params = lora.params(CLIENT_BLOCKS)
    lora.train_only(CLIENT_BLOCKS)
    optimizer = torch.optim.AdamW(params.values(), lr=CLIENT_LR, weight_decay=0.0)
    lora.peft.train()
    for batch in batches:
        response_lm_loss(lora.peft, batch).backward()
        torch.nn.utils.clip_grad_norm_(params.values(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            for name, p in params.items():
                p -= CLIENT_LR * correction[name]
    for name, p in params.items():
        torch.testing.assert_close(got[name], p.detach())
    with pytest.raises(ValueError, match="not trained here"):
        train_lora(lora, (7,), iter(batches), 1, CLIENT_LR, correction=correction)


def test_fedprox_term_has_gradient_mu_times_distance() -> None:
    generator = torch.Generator().manual_seed(0)
    anchor = {"a": torch.randn(3, 4, generator=generator), "b": torch.randn(5, generator=generator)}
    params = {
        k: (v + torch.randn(v.shape, generator=generator)).requires_grad_()
        for k, v in anchor.items()
    }
    mu = 0.3
    term = lora_proximal(params, anchor, mu)
    term.backward()
    expected = 0.5 * mu * sum(((params[k] - anchor[k]) ** 2).sum() for k in params)
    assert term.item() == pytest.approx(expected.item())
    for k, p in params.items():
        torch.testing.assert_close(p.grad, mu * (p.detach() - anchor[k]))


@pytest.mark.parametrize(
    ("server_round", "rate"),
    # OpenFedLLM: min + (max - min)(1 + cos(pi (r - 1) / T)) / 2 with max 1e-3, min 1e-5,
    # T = 4: cos(0) = 1, cos(pi/4) = 0.70711, cos(pi/2) = 0, cos(3 pi/4) = -0.70711.
    [(1, 1e-3), (2, 8.55018e-4), (3, 5.05e-4), (4, 1.54982e-4)],
)
def test_cosine_schedule_sends_openfedllms_rate_of_each_round(
    server_round: int, rate: float
) -> None:
    config = RunConfig(
        num_server_rounds=4, learning_rate=1e-3, learning_rate_min=1e-5, lr_scheduler="cosine"
    )
    sent = round_config(config, server_round, "digest")["learning-rate"]
    assert sent == pytest.approx(rate, rel=1e-5)
    assert round_learning_rate(server_round, 4, 1e-3, 1e-5, "constant") == 1e-3
