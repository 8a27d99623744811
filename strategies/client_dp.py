"""Client-level differential privacy for the FedBiOT strategies (DP-FedAvg).

McMahan et al. (ICLR 2018), with the server trusted (central DP): each client's LoRA update
``y_i - x`` (over all the blocks it trained) is clipped to L2 norm ``C``. Each array is then
averaged over its own participants: the ``m`` sampled nodes that were assigned it (all
arrays for every node, except FedBiAlign's per-node adapter depths), less those that said
they skip the round (a DPO round on a node without preference pairs). This is the
fixed-denominator estimator per array: a participant that fails or whose reply is rejected
counts as a zero update; not weighted by example counts, which would let a client's data
size scale its influence. Gaussian noise of standard deviation ``sigma * C / m`` is added to
each array, so an array trained by k of n clients is neither shrunk by k/n nor noised as if n
had trained it.

Privacy: scaled back by its ``m``, each array is the sum of the clipped updates plus noise of
std ``sigma * C``; over all arrays that is ``sum_i clip(y_i - x) + N(0, sigma^2 C^2 I)``,
where each client's clipped update, zero outside its arrays, has norm at most ``C``. So a
round is one Gaussian mechanism of noise multiplier ``sigma`` on the add/remove-one-client
relation, whatever the depths; dividing by the public counts is post-processing. As for
``n`` in DP-FedAvg, the counts (who was sampled, each node's depth, which nodes skipped) are
treated as public: they come from the server's sampling, the nodes' memory budgets and
whether a node holds preference pairs at all, never from the training data's content.
Flower's RDP accountant (Google's ``dp-accounting``) composes the rounds and reports
``epsilon`` at the configured ``delta`` after every round, without amplification by sampling:
Flower samples from whichever nodes are connected, which is neither Poisson nor uniform over
a known population. Client metrics (losses, example counts) are not privatised.

Why not Flower's ``DifferentialPrivacyServerSideFixedClipping`` wrapper around the strategy:
it adds the noise after the wrapped ``aggregate_train`` returns, but ``FedBiOTMixin`` has by
then installed the un-noised adapter in the server's models and distilled the emulator
(which goes to every client next round) against it, and FedAvgM/FedAdam/FedYogi/FedAdagrad
have fed the un-noised mean into their server optimizer state (momentum, moments and the
``1 / (sqrt(v) + tau)`` step, whose sensitivity is not ``C / n``). It also clips every
ArrayRecord of a reply against the model, its accountant refuses any strategy whose
``aggregate_train`` is not FedAvg's own, and it skips a round when one node fails. So
``ClientDPLayer`` sits between ``FedBiOTMixin`` and the algorithm in the class hierarchy,
after the mixin's per-client screening and before the algorithm's aggregation, and uses
Flower's norm, noise scale, accountant and privacy types.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import (
    GaussianPrivacyEvent,
    Grid,
    NeighboringRelation,
    PrivacyConfig,
    RdpAccountant,
    SamplingMethod,
)
from flwr.serverapp.strategy import FedAvg, FedMedian, FedTrimmedAvg, Krum
from flwr.supercore.differential_privacy import compute_stdv, get_norm

from strategies.fedbiot import FedBiOTMixin
from strategies.local_only import LocalOnly
from strategies.scaffold import Scaffold

# Algorithms whose aggregate is not a post-processed mean of the clipped updates.
_REFUSED = {
    Scaffold: "its control-variate changes are a second per-client release, unclipped and "
    "un-noised, and the server control variate built from them goes to every client",
    FedMedian: "the noise is calibrated to the mean's sensitivity C/n, not the median's",
    FedTrimmedAvg: "the noise is calibrated to the mean's sensitivity C/n, not the trimmed mean's",
    Krum: "it releases one client's own update, whose sensitivity is C, not C/n",
    LocalOnly: "the local-only baseline aggregates nothing to privatise",
}
DP_ALGORITHMS = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad")


@dataclass(frozen=True)
class ClientDP:
    """Client-level DP settings (run-config keys ``dp-clipping-norm``, ``dp-noise-multiplier``,
    ``dp-delta``); ``population`` is the number of clients (``num-partitions``)."""

    clipping_norm: float
    noise_multiplier: float
    delta: float
    population: int

    def __post_init__(self) -> None:
        checks = [
            (self.clipping_norm > 0, f"dp-clipping-norm={self.clipping_norm} must be > 0"),
            (
                self.noise_multiplier >= 0,
                f"dp-noise-multiplier={self.noise_multiplier} must be >= 0",
            ),
            (0 < self.delta < 1, f"dp-delta={self.delta} must be in (0, 1)"),
            (self.population >= 1, f"DP population={self.population} must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def privacy_config(self) -> PrivacyConfig:
        """Flower's accounting model: add/remove one client, no sampling amplification."""
        return PrivacyConfig(
            target_delta=self.delta,
            population_size=self.population,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )


class ClientDPLayer:
    """Clip, average each array over its participants and add noise, before the algorithm
    aggregates.

    The algorithm receives every valid reply with its ``arrays`` replaced by the private mean,
    so its weighted mean is that private mean whatever the weights, and its server step
    (FedAvgM momentum, FedOpt moments, learning rate) is post-processing. The mixin above
    then installs and distils the private result, never the un-noised one.
    """

    client_dp: ClientDP  # set by ``with_client_dp``
    max_norm_ratio: float  # of FedBiOTMixin
    round_metrics: dict[int, dict[str, float]]  # of FedBiOTMixin
    skipped_nodes: set[int]  # of FedBiOTMixin: this round's nodes that skipped a DPO round

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        settings = self.client_dp
        self.accountant = (
            RdpAccountant(settings.privacy_config()) if settings.noise_multiplier > 0 else None
        )
        if self.accountant is None:
            log(WARNING, "dp-noise-multiplier=0: updates are clipped, with no privacy guarantee")
        # Not NumPy's global generator (Flower's add_gaussian_noise_inplace): the run seeds it
        # from its config seed, which config.json records, so the noise could be regenerated
        # and subtracted. OS entropy cannot.
        self._noise_rng = np.random.default_rng()
        self._reference: dict[str, np.ndarray] | None = None
        self._sampled = 0
        self._assigned: dict[int, frozenset[str]] = {}

    @property
    def dp_accountant_state(self) -> dict[str, object] | None:
        """The accountant's rounds, for checkpoints; a resumed run keeps counting epsilon."""
        return None if self.accountant is None else self.accountant.state_dict()

    @dp_accountant_state.setter
    def dp_accountant_state(self, state: dict[str, object]) -> None:
        if self.accountant is None:
            raise ValueError("the checkpoint has DP accounting; dp-noise-multiplier is 0 now")
        self.accountant.load_state_dict(state)  # refuses another delta or population

    def epsilon(self) -> float:
        """Cumulative epsilon at ``dp-delta``; infinite without noise."""
        if self.accountant is None:
            return math.inf
        if self.accountant.num_releases == 0:
            return 0.0
        return self.accountant.get_epsilon(self.client_dp.delta)

    def summary(self) -> None:
        settings = self.client_dp
        log(INFO, "\t├──> Client-level DP (DP-FedAvg, server-side clipping):")
        log(INFO, "\t│\t├── Clipping norm: %s", settings.clipping_norm)
        log(INFO, "\t│\t├── Noise multiplier: %s", settings.noise_multiplier)
        log(INFO, "\t│\t└── Delta: %s", settings.delta)
        super().summary()  # type: ignore[misc]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.max_norm_ratio > 0:
            raise ValueError(
                "dp-clipping-norm > 0 needs max-update-norm-ratio=0: that screen compares "
                "each update with the other clients' median norm, so one client can get "
                "another rejected, which voids the C/n bound the noise is calibrated to "
                "(clipping already bounds every update)"
            )
        messages = super().configure_train(server_round, arrays, config, grid)  # type: ignore[misc]
        messages = list(messages)
        if len(messages) > self.client_dp.population:
            raise ValueError(
                f"{len(messages)} nodes sampled but the DP population (num-partitions) is "
                f"{self.client_dp.population}"
            )
        self._reference = {key: value.numpy() for key, value in arrays.items()}
        self._sampled = len(messages)
        # FedBiAlign's per-node keys (the top blocks of its depth); otherwise every array.
        depth_keys: dict[int, frozenset[str]] = getattr(self, "allowed_keys", {})
        everything = frozenset(self._reference)
        self._assigned = {
            node: depth_keys.get(node, everything)
            for node in (m.metadata.dst_node_id for m in messages)
        }
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # The mixin has already shifted server_round by its round_offset.
        replies = list(replies)
        valid = [reply for reply in replies if not reply.has_error()]
        clipped, std = 0, 0.0
        if valid:
            private, clipped, std = self._private_mean(valid)
            for reply in valid:
                reply.content["arrays"] = private
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        if arrays is not None and self.accountant is not None:
            self.accountant.compose(
                GaussianPrivacyEvent(
                    noise_multiplier=self.client_dp.noise_multiplier,
                    sample_size=self._sampled,
                    population_size=self.client_dp.population,
                )
            )
        epsilon = self.epsilon()
        self.round_metrics.setdefault(server_round, {}).update(
            {
                "dp_epsilon": epsilon,
                "dp_delta": self.client_dp.delta,
                "dp_noise_std": std,
                "dp_clipped_clients": clipped,
            }
        )
        log(
            INFO,
            "round %d: DP epsilon %.4g at delta %g",
            server_round,
            epsilon,
            self.client_dp.delta,
        )
        return arrays, metrics

    def _participants(self) -> dict[str, int]:
        """Per array, the sampled nodes assigned it that did not skip the round."""
        counts = dict.fromkeys(self._reference or {}, 0)
        for node, keys in self._assigned.items():
            if node not in self.skipped_nodes:
                for key in keys:
                    counts[key] += 1
        return {key: m for key, m in counts.items() if m > 0}

    def _private_mean(self, replies: list[Message]) -> tuple[ArrayRecord, int, float]:
        """Per array with ``m`` participants, ``x + sum_i clip(y_i - x) / m`` plus
        ``N(0, (sigma C / m)^2)``; the clipped count and the largest noise std."""
        if self._reference is None:
            raise RuntimeError("aggregate_train before configure_train")
        reference, participants = self._reference, self._participants()
        clipping_norm = self.client_dp.clipping_norm
        total = {key: np.zeros(value.shape) for key, value in reference.items()}
        clipped = 0
        for reply in replies:
            arrays = reply.content["arrays"]
            keys = self._assigned.get(reply.metadata.src_node_id, frozenset())
            # A client returns only the arrays it trained (FedBiAlign: its top blocks).
            update = {
                key: arrays[key].numpy() - reference[key].astype(np.float64)
                for key in arrays
                if key in keys
            }
            norm = get_norm(list(update.values()))
            scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
            clipped += int(scale < 1.0)
            for key, delta in update.items():
                total[key] += scale * delta
        private, largest = {}, 0.0
        for key, value in reference.items():
            m = participants.get(key, 0)
            if m == 0:  # nobody trained it: nothing released, it keeps its value
                private[key] = Array(value.copy())
                continue
            std = compute_stdv(self.client_dp.noise_multiplier, clipping_norm, m)
            largest = max(largest, std)
            noise = self._noise_rng.normal(0.0, std, value.shape)
            private[key] = Array((value + total[key] / m + noise).astype(value.dtype))
        return ArrayRecord(private), clipped, largest


def with_client_dp(cls: type, settings: ClientDP) -> type:
    """``cls`` (``FedBiOTMixin`` composed with an algorithm, as ``strategy_class`` makes it)
    with ``ClientDPLayer`` between the two; raises for algorithms DP-FedAvg cannot serve."""
    if cls.__bases__[:1] != (FedBiOTMixin,):
        raise TypeError(f"{cls.__name__} is not FedBiOTMixin composed with an algorithm")
    for refused, reason in _REFUSED.items():
        if issubclass(cls, refused):
            raise ValueError(
                f"dp-clipping-norm > 0 (client-level DP) cannot be combined with "
                f"{refused.__name__}: {reason}; use run-config algorithm "
                f"{', '.join(DP_ALGORITHMS)} and a method that aggregates"
            )
    if not issubclass(cls, FedAvg):
        raise ValueError(f"dp-clipping-norm > 0 needs a FedAvg-based algorithm, not {cls.__name__}")
    bases = (FedBiOTMixin, ClientDPLayer, *cls.__bases__[1:])
    # The composed class's own attributes (FedBiAlign's per-block screening) stay in front.
    own = {k: v for k, v in vars(cls).items() if not k.startswith("__")}
    return type(f"{cls.__name__}ClientDP", bases, {**own, "client_dp": settings})
