"""bench.fedbiot_claims' figure: every model of the table with its 95 % intervals, held-out
loss on the left and ranking accuracy on the right, one colour per partition, so that which
intervals overlap is seen at a glance (the verdicts themselves are paired, in the report)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from server_app.report import pyplot

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# (key in the table, axis label, scale): accuracy is drawn in percent.
PANELS = (("loss", "held-out loss (nats/token)", 1.0), ("accuracy", "ranking accuracy %", 100.0))
COLOURS = {"iid": "C0", "dirichlet": "C1", "all": "C2"}
LEGEND = {"–": "none (untrained)"}  # the base model's row has no partition


@dataclass(frozen=True)
class Point:
    """One model's value and interval on one panel."""

    label: str
    partition: str
    value: float
    low: float
    high: float


def points(table: list[dict], key: str, scale: float) -> list[Point]:
    """The table's rows that have ``key``, top to bottom in table order, scaled."""
    out = []
    for e in table:
        value = e.get(key)
        if value is None or math.isnan(value):
            continue
        out.append(
            Point(f"{e['method']} · {e['model']}", e["partition"], value * scale,
                  e[f"{key}_ci_low"] * scale, e[f"{key}_ci_high"] * scale)
        )  # fmt: skip
    return out


def _extent(length: float) -> float:
    """An error bar's length: a percentile interval can end a rounding error past its
    value, and matplotlib refuses negative lengths; a missing bound draws none."""
    return 0.0 if math.isnan(length) else max(length, 0.0)


def write_plot(document: dict, path: Path) -> Path:
    """``path`` (PNG): :func:`draw`'s figure."""
    plt = pyplot()
    figure = draw(document)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def draw(document: dict) -> Figure:
    """Both panels, the models' labels on the shared vertical axis, a bar per partition."""
    plt = pyplot()
    labels = list(dict.fromkeys(f"{e['method']} · {e['model']}" for e in document["table"]))
    rows = {label: i for i, label in enumerate(labels)}
    partitions = list(dict.fromkeys(e["partition"] for e in document["table"]))
    # Partitions side by side within a model's row, so that their intervals do not overlap.
    offset = {p: (i - (len(partitions) - 1) / 2) * 0.25 for i, p in enumerate(partitions)}
    figure, axes = plt.subplots(
        1, 2, figsize=(11, 0.35 * len(labels) + 1.5), sharey=True, squeeze=True
    )
    for axis, (key, title, scale) in zip(axes, PANELS, strict=True):
        panel = points(document["table"], key, scale)
        for partition in partitions:
            drawn = [p for p in panel if p.partition == partition]
            if not drawn:
                continue
            axis.errorbar(
                [p.value for p in drawn],
                [rows[p.label] + offset[partition] for p in drawn],
                xerr=[[_extent(p.value - p.low) for p in drawn],
                      [_extent(p.high - p.value) for p in drawn]],
                fmt="o", markersize=4, capsize=2, label=LEGEND.get(partition, partition),
                color=COLOURS.get(partition, "0.4"),
            )  # fmt: skip
        axis.set_xlabel(title)
        axis.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(range(len(labels)), labels, fontsize=8)
    axes[0].invert_yaxis()
    axes[0].legend(fontsize=8, title="partition", title_fontsize=8)  # every row has a loss
    seeds = ", ".join(str(s) for s in document["seeds"])
    figure.suptitle(f"{document['model']}, Banking77 test texts, seeds {seeds}", fontsize=10)
    figure.tight_layout()
    return figure
