"""Server updates of every aggregation algorithm against hand-computed references.

Each algorithm's strategy (Flower's, or ours where Flower has none or departs from the
paper) gets the same synthetic client models for two rounds; the arrays it returns must equal
the formulas of the papers, computed here independently with NumPy, with the optimizer
state carried from round 1 to round 2.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from federation.messages import DELTA_C, SERVER_C
from federation.run_config import RunConfig
from strategies.algorithms import inner_strategy
from tests.stand_in_grid import NodeDirectory

NODES = (11, 12, 13)
EXAMPLES = (10.0, 30.0, 60.0)
WEIGHTS = np.array(EXAMPLES) / sum(EXAMPLES)


def _record(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in values.items()})


def _numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy().astype(np.float64) for k, v in record.items()}


def _client_models(server_round: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(server_round)
    return [{"a": rng.normal(size=(3, 2)), "b": rng.normal(size=(4,))} for _ in NODES]


def _replies(messages: list[Message], models: list[dict], extra: list[dict] | None = None):
    replies = []
    for i, (message, model) in enumerate(zip(messages, models, strict=True)):
        metrics = MetricRecord({"train_loss": 1.0, "num-examples": EXAMPLES[i]})
        content = RecordDict({"arrays": _record(model), "metrics": metrics})
        if extra is not None:
            content[DELTA_C] = _record(extra[i])
        replies.append(Message(content, reply_to=message))
    return replies


def _run_rounds(algorithm: str, x0: dict[str, np.ndarray], **overrides: object):
    """Two rounds of configure_train + aggregate_train; returns the arrays after each."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    config = RunConfig(algorithm=algorithm, **overrides)
    cls, params = inner_strategy(config)
    strategy = cls(min_train_nodes=3, min_available_nodes=3, **params)
    arrays, out, sent = _record(x0), [], []
    for server_round in (1, 2):
        messages = list(
            strategy.configure_train(server_round, arrays, ConfigRecord(), NodeDirectory(NODES))
        )
        sent.append(messages)
        models = _client_models(server_round)
        deltas = _control_deltas(server_round) if algorithm == "scaffold" else None
        arrays, _ = strategy.aggregate_train(server_round, _replies(messages, models, deltas))
        out.append(_numpy(arrays))
    return out, sent


def _control_deltas(server_round: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(100 + server_round)
    return [{"a": rng.normal(size=(3, 2)), "b": rng.normal(size=(4,))} for _ in NODES]


def _weighted_mean(models: list[dict]) -> dict[str, np.ndarray]:
    return {k: sum(w * m[k] for w, m in zip(WEIGHTS, models, strict=True)) for k in models[0]}


@pytest.fixture
def x0() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"a": rng.normal(size=(3, 2)), "b": rng.normal(size=(4,))}


def _assert_close(got: dict, want: dict) -> None:
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_fedavg_and_fedprox_take_the_example_weighted_mean(x0) -> None:
    for algorithm in ("fedavg", "fedprox"):
        out, sent = _run_rounds(algorithm, x0)
        for server_round in (1, 2):
            _assert_close(out[server_round - 1], _weighted_mean(_client_models(server_round)))
    # FedProx tells the clients its mu.
    assert sent[0][0].content["config"]["proximal-mu"] == RunConfig().proximal_mu


def test_fedavgm_applies_server_momentum(x0) -> None:
    lr, beta = 0.7, 0.9
    out, _ = _run_rounds("fedavgm", x0, server_learning_rate=lr, server_momentum=beta)
    x, velocity = x0, None
    for server_round in (1, 2):
        mean = _weighted_mean(_client_models(server_round))
        grad = {k: x[k] - mean[k] for k in x}
        velocity = grad if velocity is None else {k: beta * velocity[k] + grad[k] for k in x}
        x = {k: x[k] - lr * velocity[k] for k in x}
        _assert_close(out[server_round - 1], x)


@pytest.mark.parametrize("algorithm", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_server_optimizers_follow_reddi_et_al(algorithm: str, x0) -> None:
    eta, beta1, beta2, tau = 0.05, 0.8, 0.95, 1e-2
    out, _ = _run_rounds(
        algorithm, x0, fedopt_eta=eta, fedopt_beta_1=beta1, fedopt_beta_2=beta2, fedopt_tau=tau
    )
    x = x0
    m = {k: np.zeros_like(v) for k, v in x0.items()}
    v = {k: np.full_like(val, tau**2) for k, val in x0.items()}  # v_{-1} = tau^2
    for server_round in (1, 2):
        mean = _weighted_mean(_client_models(server_round))
        delta = {k: mean[k] - x[k] for k in x}
        m = {k: beta1 * m[k] + (1 - beta1) * delta[k] for k in x}
        d2 = {k: delta[k] ** 2 for k in x}
        if algorithm == "fedadam":
            v = {k: beta2 * v[k] + (1 - beta2) * d2[k] for k in x}
        elif algorithm == "fedyogi":
            v = {k: v[k] - (1 - beta2) * d2[k] * np.sign(v[k] - d2[k]) for k in x}
        else:
            v = {k: v[k] + d2[k] for k in x}
        x = {k: x[k] + eta * m[k] / (np.sqrt(v[k]) + tau) for k in x}
        _assert_close(out[server_round - 1], x)


def test_scaffold_moves_the_model_and_the_server_control_variate(x0) -> None:
    lr = 0.5
    out, sent = _run_rounds("scaffold", x0, server_learning_rate=lr)
    x = x0
    c = {k: np.zeros_like(v) for k, v in x0.items()}
    for server_round in (1, 2):
        sent_c = _numpy(sent[server_round - 1][0].content[SERVER_C])
        _assert_close(sent_c, c)
        assert set(sent[server_round - 1][0].content.array_records) == {"arrays", SERVER_C}
        # Unweighted, like c's update below: the example counts 10/30/60 play no part.
        models = _client_models(server_round)
        mean = {k: sum(m[k] for m in models) / len(models) for k in x}
        x = {k: x[k] + lr * (mean[k] - x[k]) for k in x}
        deltas = _control_deltas(server_round)
        c = {k: c[k] + sum(d[k] for d in deltas) / len(NODES) for k in c}
        _assert_close(out[server_round - 1], x)


def test_fedmedian_takes_the_coordinate_wise_median(x0) -> None:
    out, _ = _run_rounds("fedmedian", x0)
    for server_round in (1, 2):
        models = _client_models(server_round)
        want = {k: np.median(np.stack([m[k] for m in models]), axis=0) for k in x0}
        _assert_close(out[server_round - 1], want)


@pytest.mark.parametrize("beta", [0.2, 0.34])
def test_fedtrimmedavg_drops_the_extremes_then_averages(beta: float, x0) -> None:
    out, _ = _run_rounds("fedtrimmedavg", x0, trimmed_beta=beta)
    cut = int(beta * len(NODES))  # 0.2 of 3 trims nothing; 0.34 one model's value per end
    for server_round in (1, 2):
        models = _client_models(server_round)
        want = {
            k: np.sort(np.stack([m[k] for m in models]), axis=0)[cut : len(NODES) - cut].mean(0)
            for k in x0
        }
        _assert_close(out[server_round - 1], want)


def test_krum_picks_the_model_closest_to_the_others(x0) -> None:
    out, _ = _run_rounds("krum", x0)
    for server_round in (1, 2):
        models = _client_models(server_round)
        flat = [np.concatenate([m[k].ravel() for k in sorted(m)]) for m in models]
        # n - f - 2 = 1 nearest neighbour with 3 clients and no malicious node.
        scores = [
            min(np.sum((flat[i] - flat[j]) ** 2) for j in range(3) if j != i) for i in range(3)
        ]
        _assert_close(out[server_round - 1], models[int(np.argmin(scores))])
