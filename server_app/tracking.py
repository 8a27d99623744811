"""Experiment tracking (run-config ``report-to``): every ``metrics.jsonl`` row also goes to
TensorBoard (``<run>/tensorboard/``) or Weights & Biases, numeric keys only, step = round.

Neither package is a dependency of the project (extras ``tracking`` and ``wandb``), so
``check_tracking`` refuses a missing one when the ServerApp starts, before any weights load.
Every tracker opened is closed by ``close_trackers`` when the ServerApp ends, failed or not:
a W&B run left unfinished has no exit record, and ``wandb sync`` uploads it as crashed.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from pathlib import Path
from typing import Any

from federation.run_config import ConfigError

# report-to value -> (module it needs, pyproject extra that installs it)
_PACKAGES = {"tensorboard": ("tensorboard", "tracking"), "wandb": ("wandb", "wandb")}
_WANDB_HOST = ("api.wandb.ai", 443)
# The trackers this process opened and has not closed (a ServerApp process runs one run).
_OPEN: list[Tracker] = []


def check_tracking(report_to: str) -> None:
    """Raise :class:`ConfigError` naming the key and the extra when the package is missing."""
    if report_to not in _PACKAGES:
        return
    module, extra = _PACKAGES[report_to]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"run-config report-to={report_to!r} needs the {module} package, which is not "
            f"installed: pip install '.[{extra}]' (or report-to='none')"
        )


def _numeric(row: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in row.items()
        if k != "round" and isinstance(v, int | float) and not isinstance(v, bool)
    }


class Tracker:
    """Logs rows to the configured backend; ``resumed_at``: drop what a resumed run logged
    after its checkpoint's round, as ``metrics.jsonl`` does."""

    def __init__(
        self, report_to: str, run_dir: Path, config: dict[str, Any], resumed_at: int | None
    ) -> None:
        check_tracking(report_to)
        self.report_to = report_to
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resumed_at is None else resumed_at + 1
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)
        else:
            import wandb

            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "fedbiot"),
                name=run_dir.name,
                id=run_dir.name,
                resume="allow",
                dir=str(run_dir),
                config=config,
                mode=os.environ.get("WANDB_MODE") or _wandb_mode(),
            )

    def log(self, row: dict[str, Any]) -> None:
        """One ``metrics.jsonl`` row at step ``row["round"]``, written through at once (the
        ServerApp may be stopped at any round)."""
        values, step = _numeric(row), int(row["round"])
        if self.report_to == "tensorboard":
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        else:
            self.run.log(values, step=step)

    def close(self, failed: bool) -> None:
        """Flush and close the backend; a W&B run ends with exit code 1 when the run failed."""
        if self.report_to == "tensorboard":
            self.writer.close()
        else:
            self.run.finish(exit_code=1 if failed else 0)


def _wandb_mode() -> str:
    """``online`` when the W&B server answers, else ``offline`` (sync later with
    ``wandb sync <run>/wandb``): a run without network must not fail on its tracker."""
    try:
        with socket.create_connection(_WANDB_HOST, timeout=3):
            return "online"
    except OSError:
        return "offline"


def open_tracker(
    report_to: str, run_dir: Path, config: dict[str, Any], resumed_at: int | None
) -> Tracker | None:
    """The run's tracker, or None for ``report-to=none``."""
    if report_to == "none":
        return None
    tracker = Tracker(report_to, run_dir, config, resumed_at)
    _OPEN.append(tracker)
    return tracker


def close_trackers(failed: bool) -> None:
    """Close every tracker this process opened (the end of a ServerApp, failed or not)."""
    while _OPEN:
        _OPEN.pop().close(failed)
