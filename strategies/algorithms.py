"""The aggregation algorithm of a run: a Flower strategy composed with the FedBiOT mixin.

Flower's ``flwr.serverapp.strategy`` already has FedAvg, FedProx, FedAvgM, FedAdam, FedYogi,
FedAdagrad, FedMedian, FedTrimmedAvg and Krum; they are used as they are, except for two
departures from Reddi et al. (2021, Algorithm 2) that are corrected here:

- Flower's FedAdam multiplies the server learning rate by an Adam bias correction
  ``sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1))``, which the paper does not have;
- Flower starts the second moment at ``v = 0``; the paper starts it at ``v_{-1} = tau^2``;
- Flower's FedAdagrad fixes ``beta_1 = 0``; the paper's Algorithm 2 keeps the momentum
  ``m_t = beta_1 m_{t-1} + (1 - beta_1) Delta_t`` for all three, so ``fedopt-beta-1`` is used.

SCAFFOLD is not in Flower and lives in ``strategies/scaffold.py``. The local-only baseline
(no aggregation) is in ``strategies/local_only.py``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
)

from federation.run_config import RunConfig
from strategies.fedbiot import FedBiOTMixin
from strategies.local_only import LocalOnly
from strategies.scaffold import Scaffold


class _PaperSecondMoment:
    """Start FedOpt's second moment at ``tau^2`` (Reddi et al., Algorithm 2)."""

    tau: float
    v_t: dict[str, np.ndarray] | None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.v_t is None:
            self.v_t = {
                k: np.full_like(a.numpy(), self.tau**2, dtype=a.numpy().dtype)
                for k, a in arrays.items()
            }
        return super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]


class PaperFedAdam(_PaperSecondMoment, FedAdam):
    """FedAdam as in the paper: ``x + eta * m / (sqrt(v) + tau)``, no bias correction."""

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        mean, metrics = FedAvg.aggregate_train(self, server_round, replies)
        if mean is None:
            return None, metrics
        delta, m_t, _ = self._compute_deltat_and_mt(mean)
        assert self.v_t is not None and self.current_arrays is not None
        self.v_t = {
            k: self.beta_2 * v + (1 - self.beta_2) * delta[k] ** 2 for k, v in self.v_t.items()
        }
        new = {
            k: x + self.eta * m_t[k] / (np.sqrt(self.v_t[k]) + self.tau)
            for k, x in self.current_arrays.items()
        }
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in new.items()}), metrics


class PaperFedYogi(_PaperSecondMoment, FedYogi):
    """Flower's FedYogi update with the paper's initial second moment."""


class PaperFedAdagrad(_PaperSecondMoment, FedAdagrad):
    """Flower's FedAdagrad update with the paper's initial second moment and momentum."""

    def __init__(self, *, beta_1: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # FedAdagrad's constructor passes beta_1=0 to FedOpt; m_t reads self.beta_1.
        self.beta_1 = beta_1


def inner_strategy(config: RunConfig) -> tuple[type, dict[str, Any]]:
    """The Flower strategy class of ``config.algorithm`` and its algorithm parameters."""
    fedopt = {
        "eta": config.fedopt_eta,
        "eta_l": config.learning_rate,
        "tau": config.fedopt_tau,
    }
    betas = {"beta_1": config.fedopt_beta_1, "beta_2": config.fedopt_beta_2}
    table: dict[str, tuple[type, dict[str, Any]]] = {
        "fedavg": (FedAvg, {}),
        "fedprox": (FedProx, {"proximal_mu": config.proximal_mu}),
        "fedavgm": (
            FedAvgM,
            {
                "server_learning_rate": config.server_learning_rate,
                "server_momentum": config.server_momentum,
            },
        ),
        "scaffold": (
            Scaffold,
            {
                "server_learning_rate": config.server_learning_rate,
                "local_steps": config.local_steps,
                "local_learning_rate": config.learning_rate,
            },
        ),
        "fedadam": (PaperFedAdam, {**fedopt, **betas}),
        "fedyogi": (PaperFedYogi, {**fedopt, **betas}),
        "fedadagrad": (PaperFedAdagrad, {**fedopt, "beta_1": config.fedopt_beta_1}),
        "fedmedian": (FedMedian, {}),
        "fedtrimmedavg": (FedTrimmedAvg, {"beta": config.trimmed_beta}),
        "krum": (Krum, {"num_malicious_nodes": config.krum_malicious}),
    }
    return table[config.algorithm]


def strategy_class(config: RunConfig, aggregates: bool = True) -> tuple[type, dict[str, Any]]:
    """``FedBiOTMixin`` in front of the algorithm's strategy (or of ``LocalOnly``)."""
    inner, params = inner_strategy(config) if aggregates else (LocalOnly, {})
    name = f"{config.method.capitalize()}{inner.__name__}"
    return type(name, (FedBiOTMixin, inner), {}), params
