"""A bounded per-round record of each client's update, and its per-round summary.

For every client of a round: its update norm ``||y_i - x||`` and the cosine similarity of its
update with the aggregate update ``x_new - x``, both over the keys the client returned (a
shallow client trained fewer blocks), with its depth and example count. Rounds beyond the
bound are dropped oldest first, so a long run's memory stays flat.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class UpdateRow:
    """One client's update in one round."""

    node: int
    depth: int
    num_examples: int
    norm: float
    cosine: float


def update_stats(
    sent: Mapping[str, torch.Tensor],
    aggregate: Mapping[str, torch.Tensor],
    returned: Mapping[str, torch.Tensor],
) -> tuple[float, float]:
    """``(||y_i - x||, cos(y_i - x, x_new - x))`` over the keys of ``returned``, in float64.

    The cosine is NaN when either update is zero (it has no direction).
    """
    dot = own = agg = 0.0
    for name, value in returned.items():
        base = sent[name].to(torch.float64)
        mine = value.to(torch.float64) - base
        theirs = aggregate[name].to(torch.float64) - base
        dot += float((mine * theirs).sum())
        own += float((mine * mine).sum())
        agg += float((theirs * theirs).sum())
    norm = math.sqrt(own)
    cosine = dot / (norm * math.sqrt(agg)) if own > 0 and agg > 0 else math.nan
    return norm, cosine


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


class UpdateHistory:
    """Rows of the last ``max_rounds`` rounds, by round."""

    def __init__(self, max_rounds: int) -> None:
        if max_rounds < 1:
            raise ValueError(f"max_rounds={max_rounds} must be >= 1")
        self.max_rounds = max_rounds
        self._rounds: OrderedDict[int, list[UpdateRow]] = OrderedDict()

    @property
    def rounds(self) -> list[int]:
        """The rounds still held, oldest first."""
        return list(self._rounds)

    def add(self, server_round: int, row: UpdateRow) -> None:
        """Record a client's update; a new round beyond the bound drops the oldest."""
        self._rounds.setdefault(server_round, []).append(row)
        while len(self._rounds) > self.max_rounds:
            self._rounds.popitem(last=False)

    def rows(self, server_round: int) -> list[dict[str, float | int]]:
        """A round's per-node rows (for a JSON lines or CSV file)."""
        return [{"round": server_round, **asdict(r)} for r in self._get(server_round)]

    def round_summary(self, server_round: int) -> dict[str, float]:
        """Flat metrics of a round (for metrics.jsonl); cosines that are NaN are left out."""
        rows = self._get(server_round)
        norms = [r.norm for r in rows]
        cosines = [r.cosine for r in rows if not math.isnan(r.cosine)]
        summary = {
            "update_norm_mean": _mean(norms),
            "update_norm_max": max(norms, default=math.nan),
            "update_cosine_mean": _mean(cosines),
            "update_cosine_min": min(cosines, default=math.nan),
        }
        for depth in sorted({r.depth for r in rows}):
            summary[f"clients_depth_{depth}"] = float(sum(r.depth == depth for r in rows))
        return summary

    def _get(self, server_round: int) -> list[UpdateRow]:
        if server_round not in self._rounds:
            raise KeyError(f"round {server_round} is not in the update history {self.rounds}")
        return self._rounds[server_round]
