"""Client-level DP: clipping, noise on the mean before the server step, epsilon accounting.

Real Flower messages through a real FedBiOT strategy on a tiny model: configure_train samples
the nodes and records the arrays sent, the replies carry client models ``x + update``.
"""

from __future__ import annotations

from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from federation.run_choices import ALGORITHMS
from federation.run_config import RunConfig
from models.blocks import get_blocks
from models.fedbiot_models import FedBiOTModels
from models.layout import fedbiot_layout
from models.lora import LoraSpec
from models.wire import to_record
from server_app.checkpoint import load_checkpoint, restore, save_checkpoint
from strategies.algorithms import strategy_class
from strategies.client_dp import DP_ALGORITHMS, ClientDP, ClientDPLayer, with_client_dp
from strategies.depth_aggregation import FedBiAlign, top_block_keys
from strategies.fedbiot import FedBiOT, FedBiOTMixin
from tests.stand_in_grid import NodeDirectory
from tests.tiny import tiny

Update = dict[str, np.ndarray]


@pytest.fixture(scope="module")
def models() -> FedBiOTModels:
    model, tokenizer = tiny("tiny-llama")
    layout = fedbiot_layout(len(get_blocks(model)), 2, 0.5)
    return FedBiOTModels(model, tokenizer, layout, LoraSpec(r=4, alpha=8))


def _strategy(
    models: FedBiOTModels,
    nodes: int,
    settings: ClientDP,
    cls: type = FedBiOT,
    **kwargs: object,
) -> ClientDPLayer:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    kwargs = {"max_norm_ratio": 0.0, **kwargs}
    return with_client_dp(cls, settings)(
        models=models,
        distiller=None,
        distill_steps=0,
        min_train_nodes=nodes,
        min_available_nodes=nodes,
        **kwargs,
    )


def _dp(noise_multiplier: float, clipping_norm: float = 1.0, population: int = 8) -> ClientDP:
    return ClientDP(clipping_norm, noise_multiplier, delta=1e-5, population=population)


def _direction(template: ArrayRecord, norm: float, seed: int) -> Update:
    """A random update of the given L2 norm over all arrays."""
    rng = np.random.default_rng(seed)
    update = {k: rng.normal(size=v.shape) for k, v in template.items()}
    scale = norm / np.sqrt(sum(np.sum(u**2) for u in update.values()))
    return {k: u * scale for k, u in update.items()}


def _round(
    strategy: ClientDPLayer, server_round: int, nodes: int, updates: list[Update | None]
) -> tuple[ArrayRecord, ArrayRecord]:
    """One configure/aggregate round; ``None`` is a node whose reply is an error."""
    x = to_record(strategy.models.adapter_state())
    messages = list(
        strategy.configure_train(
            server_round, x, ConfigRecord(), NodeDirectory(range(1, nodes + 1))
        )
    )
    replies = []
    for message, update in zip(messages, updates, strict=True):
        if update is None:
            replies.append(Message(Error(code=0, reason="out of memory"), reply_to=message))
            continue
        arrays = ArrayRecord(
            {k: Array((v.numpy() + update[k]).astype(np.float32)) for k, v in x.items()}
        )
        metrics = MetricRecord({"train_loss": 1.0, "num-examples": 10})
        replies.append(
            Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=message)
        )
    arrays, _ = strategy.aggregate_train(server_round, replies)
    assert arrays is not None
    return x, arrays


def _offset(arrays: ArrayRecord, x: ArrayRecord, mean: Update) -> np.ndarray:
    """``arrays - x - mean``, flattened."""
    return np.concatenate(
        [(arrays[k].numpy().astype(np.float64) - v.numpy() - mean[k]).ravel() for k, v in x.items()]
    )


def test_clipping_bounds_each_update_norm_to_c(models: FedBiOTModels) -> None:
    strategy = _strategy(models, 3, _dp(noise_multiplier=0.0, clipping_norm=0.5))
    template = to_record(models.adapter_state())
    large, small = _direction(template, 5.0, 1), _direction(template, 0.2, 2)
    zero = {k: np.zeros(v.shape) for k, v in template.items()}

    x, arrays = _round(strategy, 1, 3, [large, small, zero])

    # The norm-10C update comes out scaled to C, the one below C untouched, over n = 3.
    clipped_large = {k: v * 0.5 / 5.0 for k, v in large.items()}
    mean = {k: (clipped_large[k] + small[k]) / 3 for k in large}
    assert np.abs(_offset(arrays, x, mean)).max() < 1e-6
    recovered = 3 * _offset(arrays, x, {k: small[k] / 3 for k in small})
    assert np.linalg.norm(recovered) == pytest.approx(0.5, rel=1e-5)
    metrics = strategy.round_metrics[1]
    assert metrics["dp_clipped_clients"] == 1
    assert metrics["dp_noise_std"] == 0.0
    assert metrics["dp_epsilon"] == float("inf")  # clipping alone gives no guarantee


def test_failed_and_rejected_clients_count_as_zero_updates(models: FedBiOTModels) -> None:
    strategy = _strategy(models, 4, _dp(noise_multiplier=0.0))
    template = to_record(models.adapter_state())
    a, b = _direction(template, 0.3, 3), _direction(template, 0.4, 4)
    nan = {k: np.full(v.shape, np.nan) for k, v in template.items()}

    x, arrays = _round(strategy, 1, 4, [a, b, None, nan])

    # The fixed denominator: divided by the 4 sampled nodes, not the 2 that counted.
    mean = {k: (a[k] + b[k]) / 4 for k in a}
    assert np.abs(_offset(arrays, x, mean)).max() < 1e-6
    metrics = strategy.round_metrics[1]
    assert metrics["clients_failed"] == 1 and metrics["clients_rejected"] == 1


def test_noise_on_the_mean_has_std_sigma_c_over_n_and_is_installed(
    models: FedBiOTModels,
) -> None:
    sigma, c, n = 2.0, 0.5, 4
    strategy = _strategy(models, n, _dp(sigma, c))
    template = to_record(models.adapter_state())
    updates = [_direction(template, 10 * c, seed) for seed in range(n)]

    x, arrays = _round(strategy, 1, n, updates)

    clipped_mean = {k: sum(u[k] for u in updates) * (c / (10 * c)) / n for k in updates[0]}
    noise = _offset(arrays, x, clipped_mean)
    assert noise.size > 5000
    assert noise.std() == pytest.approx(sigma * c / n, rel=0.05)
    assert abs(noise.mean()) < 5 * sigma * c / n / np.sqrt(noise.size)
    assert strategy.round_metrics[1]["dp_noise_std"] == pytest.approx(sigma * c / n)
    # The server's models hold the noised aggregate (what is distilled against and exported).
    for name, value in arrays.items():
        for lora in (models.full, models.compressed):
            installed = lora.params()[name].detach().numpy()
            np.testing.assert_array_equal(installed, value.numpy())


def test_the_server_optimizer_steps_on_the_noised_mean(models: FedBiOTModels) -> None:
    sigma, c, n, lr = 2.0, 0.5, 4, 0.5
    config = RunConfig(algorithm="fedavgm", server_learning_rate=lr, server_momentum=0.0)
    cls, params = strategy_class(config)
    strategy = _strategy(models, n, _dp(sigma, c), cls, **params)
    template = to_record(models.adapter_state())
    updates = [_direction(template, 0.1, seed) for seed in range(n)]

    x, arrays = _round(strategy, 1, n, updates)

    # x + lr * (mean + z - x): noise added after the server step would have std sigma*C/n.
    step = {k: lr * sum(u[k] for u in updates) / n for k in updates[0]}
    assert _offset(arrays, x, step).std() == pytest.approx(lr * sigma * c / n, rel=0.05)


def _depth_round(
    strategy: ClientDPLayer, updates: dict[int, Update], skips: frozenset[int] = frozenset()
) -> tuple[ArrayRecord, ArrayRecord]:
    """A round where node ``i`` returns ``x + updates[i]`` on the keys of ``updates[i]`` only
    (FedBiAlign's top blocks), and the nodes in ``skips`` skip it (a DPO round)."""
    x = to_record(strategy.models.adapter_state())
    messages = list(
        strategy.configure_train(1, x, ConfigRecord(), NodeDirectory(range(1, len(updates) + 1)))
    )
    replies = []
    for message in messages:
        node = message.metadata.dst_node_id
        if node in skips:
            metrics = MetricRecord({"dpo_skipped": 1, "num-examples": 0})
            replies.append(Message(RecordDict({"metrics": metrics}), reply_to=message))
            continue
        update = updates[node]
        arrays = ArrayRecord(
            {k: Array((x[k].numpy() + v).astype(np.float32)) for k, v in update.items()}
        )
        metrics = MetricRecord({"train_loss": 1.0, "num-examples": 10 * node})
        replies.append(
            Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=message)
        )
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    return x, arrays


def _fedbialign(models: FedBiOTModels, settings: ClientDP) -> ClientDPLayer:
    """Nodes 1, 2, 3 of adapter depths 1, 2, 2: the lower adapter block is trained by 2 of 3."""
    return _strategy(models, 3, settings, FedBiAlign, node_depths={1: 1, 2: 2, 3: 2})


def _block_updates(template: ArrayRecord, norm: float) -> tuple[set[str], dict[int, Update]]:
    top = set(top_block_keys(template, 1))
    updates = {node: _direction(template, norm, node) for node in (1, 2, 3)}
    updates[1] = {k: v for k, v in updates[1].items() if k in top}
    return top, updates


def _per_key_offset(arrays: ArrayRecord, x: ArrayRecord, mean: Update, keys) -> np.ndarray:
    return np.concatenate(
        [(arrays[k].numpy().astype(np.float64) - x[k].numpy() - mean[k]).ravel() for k in keys]
    )


def test_a_block_trained_by_k_of_n_clients_is_their_mean_not_shrunk_by_k_over_n(
    models: FedBiOTModels,
) -> None:
    strategy = _fedbialign(models, _dp(noise_multiplier=0.0, clipping_norm=10.0))
    template = to_record(models.adapter_state())
    top, updates = _block_updates(template, 0.5)

    x, arrays = _depth_round(strategy, updates)

    lower = set(template) - top
    mean = {k: sum(u[k] for u in updates.values() if k in u) / 3 for k in top}
    mean.update({k: (updates[2][k] + updates[3][k]) / 2 for k in lower})
    assert np.abs(_offset(arrays, x, mean)).max() < 1e-6


def test_each_block_is_noised_for_its_own_participants_at_one_sigma_charge(
    models: FedBiOTModels,
) -> None:
    sigma, c = 2.0, 0.5
    strategy = _fedbialign(models, _dp(sigma, c))
    template = to_record(models.adapter_state())
    top, updates = _block_updates(template, 0.1)  # below C: nothing clipped

    x, arrays = _depth_round(strategy, updates)

    lower = set(template) - top
    mean = {k: sum(u[k] for u in updates.values() if k in u) / 3 for k in top}
    mean.update({k: (updates[2][k] + updates[3][k]) / 2 for k in lower})
    for keys, m in ((top, 3), (lower, 2)):
        noise = _per_key_offset(arrays, x, mean, sorted(keys))
        assert noise.size > 2000
        assert noise.std() == pytest.approx(sigma * c / m, rel=0.05)
    metrics = strategy.round_metrics[1]
    assert metrics["dp_noise_std"] == pytest.approx(sigma * c / 2)
    assert metrics["dp_epsilon"] == pytest.approx(_reference_epsilon(sigma, 1, 1e-5), rel=1e-9)


def test_a_dpo_round_averages_over_the_clients_that_did_not_skip(models: FedBiOTModels) -> None:
    strategy = _strategy(models, 3, _dp(noise_multiplier=0.0, clipping_norm=10.0))
    template = to_record(models.adapter_state())
    updates = {node: _direction(template, 0.5, node) for node in (1, 2, 3)}

    x, arrays = _depth_round(strategy, updates, skips=frozenset({3}))

    mean = {k: (updates[1][k] + updates[2][k]) / 2 for k in template}
    assert np.abs(_offset(arrays, x, mean)).max() < 1e-6
    assert strategy.round_metrics[1]["clients_skipped"] == 1


def _reference_epsilon(sigma: float, rounds: int, delta: float) -> float:
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(sigma), rounds)
    return accountant.get_epsilon(delta)


def test_reported_epsilon_is_the_rdp_accountants_and_survives_a_resume(
    models: FedBiOTModels, tmp_path: Path
) -> None:
    sigma, n = 1.1, 3
    strategy = _strategy(models, n, _dp(sigma, population=5))
    template = to_record(models.adapter_state())
    epsilons = []
    for server_round in (1, 2, 3):
        _round(strategy, server_round, n, [_direction(template, 0.1, i) for i in range(n)])
        metrics = strategy.round_metrics[server_round]
        assert metrics["dp_delta"] == 1e-5
        reference = _reference_epsilon(sigma, server_round, 1e-5)
        assert metrics["dp_epsilon"] == pytest.approx(reference, rel=1e-9)
        epsilons.append(metrics["dp_epsilon"])
    assert epsilons[0] < epsilons[1] < epsilons[2]

    # A checkpoint carries the accountant: the resumed run's round 1 is round 4.
    save_checkpoint(tmp_path, 3, models, strategy, None)  # through a weights_only file
    resumed = _strategy(models, n, _dp(sigma, population=5))
    resumed.round_offset = restore(load_checkpoint(tmp_path)[0], models, resumed, None)
    _round(resumed, 1, n, [_direction(template, 0.1, i) for i in range(n)])
    assert resumed.round_metrics[4]["dp_epsilon"] == pytest.approx(
        _reference_epsilon(sigma, 4, 1e-5), rel=1e-9
    )
    other_delta = _strategy(models, n, ClientDP(1.0, sigma, delta=1e-6, population=5))
    with pytest.raises(ValueError, match="configuration"):
        other_delta.dp_accountant_state = strategy.dp_accountant_state


def test_dp_composes_with_the_mean_based_algorithms_only() -> None:
    refused = {"scaffold", "fedmedian", "fedtrimmedavg", "krum"}
    assert set(DP_ALGORITHMS) == set(ALGORITHMS) - refused
    for algorithm in DP_ALGORITHMS:
        cls = with_client_dp(strategy_class(RunConfig(algorithm=algorithm))[0], _dp(1.0))
        assert cls.__mro__[1:3] == (FedBiOTMixin, ClientDPLayer)
    for algorithm in refused:
        with pytest.raises(ValueError, match=r"dp-clipping-norm .* algorithm fedavg"):
            with_client_dp(strategy_class(RunConfig(algorithm=algorithm))[0], _dp(1.0))
    local = strategy_class(RunConfig(method="local"), aggregates=False)[0]
    with pytest.raises(ValueError, match="local-only"):
        with_client_dp(local, _dp(1.0))
    with pytest.raises(TypeError, match="not FedBiOTMixin"):
        with_client_dp(FedAvg, _dp(1.0))


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ((0.0, 1.0, 1e-5, 3), "dp-clipping-norm"),
        ((1.0, -0.1, 1e-5, 3), "dp-noise-multiplier"),
        ((1.0, 1.0, 1.0, 3), "dp-delta"),
        ((1.0, 1.0, 1e-5, 0), "population"),
    ],
)
def test_bad_settings_name_their_key(values: tuple, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        ClientDP(*values)


def test_norm_ratio_screen_and_oversampling_are_refused(models: FedBiOTModels) -> None:
    x = to_record(models.adapter_state())
    screened = _strategy(models, 3, _dp(1.0), max_norm_ratio=10.0)
    with pytest.raises(ValueError, match="max-update-norm-ratio=0"):
        screened.configure_train(1, x, ConfigRecord(), NodeDirectory(range(1, 4)))
    crowded = _strategy(models, 3, _dp(1.0, population=2))
    with pytest.raises(ValueError, match="population"):
        crowded.configure_train(1, x, ConfigRecord(), NodeDirectory(range(1, 4)))
