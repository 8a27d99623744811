"""A run's results folder: config.json (config, versions, layout), metrics.jsonl and .csv."""

from __future__ import annotations

import csv
import importlib.metadata
import json
import math
import platform
import resource
import time
from pathlib import Path
from typing import Any

from federation.run_config import RunConfig
from models.layout import Layout
from server_app.superlink_guard import check_superlink
from server_app.tracking import open_tracker
from strategies.shipment import NODE_KEYS

_PACKAGES = (
    "flwr",
    "flwr-datasets",
    "torch",
    "transformers",
    "peft",
    "datasets",
    "accelerate",
    "numpy",
    "safetensors",
)


# Optional packages, recorded only where installed: bitsandbytes quantizes a node's frozen
# weights (the ``gpu`` extra); trl is the DPO reference of the tests (the ``dev`` extra).
_OPTIONAL_PACKAGES = ("bitsandbytes", "trl")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that decide a run's numbers."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES + _OPTIONAL_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            if name not in _OPTIONAL_PACKAGES:
                versions[name] = "not installed"
    return versions


class RunRecorder:
    """Creates ``<output-dir>/<run-name>/`` and appends one JSON object per round; every write
    first checks that the SuperLink still answers (``server_app.superlink_guard``)."""

    def __init__(
        self, config: RunConfig, resume_dir: Path | None = None, resume_round: int | None = None
    ) -> None:
        """A new run folder; or, when resuming, the old one with rows after the checkpoint's
        round dropped (the server may have logged a round it did not checkpoint)."""
        self.config = config
        self.rows: list[dict[str, Any]] = []
        if resume_dir is not None:
            self.dir = resume_dir
            self.resumed_at = resume_round
            self._truncate(resume_round or 0)
        else:
            self.resumed_at = None
            name = config.run_name or time.strftime(f"{config.method}-%Y%m%d-%H%M%S")
            self.dir = Path(config.output_dir).expanduser().resolve() / name
            if (self.dir / "metrics.jsonl").exists():
                raise FileExistsError(f"{self.dir} already holds a run; pick another run-name")
            self.dir.mkdir(parents=True, exist_ok=True)
        self.tracker = open_tracker(config.report_to, self.dir, config.to_dict(), self.resumed_at)

    def _truncate(self, last_round: int) -> None:
        check_superlink()
        path = self.dir / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        self.rows = [r for r in rows if r["round"] <= last_round]
        path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows))
        comm = self.dir / "communication.csv"
        if comm.exists():
            lines = comm.read_text().splitlines(keepends=True)
            kept = [lines[0]] + [ln for ln in lines[1:] if int(ln.split(",")[0]) <= last_round]
            comm.write_text("".join(kept))

    def write_config(self, layout: Layout, extra: dict[str, Any]) -> None:
        check_superlink()
        document = {
            "run_config": self.config.to_dict(),
            "versions": package_versions(),
            "layout": layout.to_dict(),
            "adapter_blocks": list(layout.adapter_blocks),
            "emulator_blocks": list(layout.emulator_blocks),
            **extra,
        }
        name = f"config-resumed-{self.resumed_at}.json" if self.resumed_at else "config.json"
        (self.dir / name).write_text(json.dumps(document, indent=2))

    def write_json(self, name: str, document: object) -> None:
        """A JSON side file of the run (e.g. ``depth_memory.json``)."""
        check_superlink()
        (self.dir / name).write_text(json.dumps(document, indent=2, sort_keys=True))

    def append_jsonl(self, name: str, rows: list[dict[str, Any]]) -> None:
        """Rows appended to a JSON-lines side file (e.g. ``update_history.jsonl``)."""
        check_superlink()
        with open(self.dir / name, "a") as f:
            for row in rows:
                f.write(json.dumps(_finite(row), sort_keys=True) + "\n")

    def append_round(self, record: dict[str, Any]) -> None:
        """Append to ``metrics.jsonl``, rewrite ``metrics.csv`` (one column per key seen) and
        log the row to the tracker of ``report-to``."""
        check_superlink()
        clean = _finite({**record, "server_peak_rss_mb": _peak_rss_mb()})
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(clean, sort_keys=True) + "\n")
        self.rows.append(clean)
        self._write_csv()
        if self.tracker is not None:
            self.tracker.log(clean)

    def amend_round(self, server_round: int, values: dict[str, float]) -> None:
        """Add keys to the last row, that of ``server_round``, known only after it was written
        (the checkpoint's time: a checkpoint follows its round's row, so a resumed run never
        lacks a checkpointed round's row). The tracker has logged the row without them."""
        check_superlink()
        if not self.rows or self.rows[-1]["round"] != server_round:
            raise ValueError(f"metrics.jsonl: round {server_round} is not the last row")
        self.rows[-1].update(_finite(values))
        path = self.dir / "metrics.jsonl"
        temporary = path.with_suffix(".jsonl.tmp")
        temporary.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows))
        temporary.replace(path)
        self._write_csv()

    def _write_csv(self) -> None:
        """``metrics.csv``: every row, one column per key seen."""
        columns = sorted({k for row in self.rows for k in row}, key=lambda k: (k != "round", k))
        with open(self.dir / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)

    def append_communication(
        self,
        server_round: int,
        per_node: dict[int, dict[str, int]],
        partitions: dict[int, tuple[int, int]],
    ) -> None:
        """One row per node and round in ``communication.csv``: the bytes each client got
        and sent, measured from the actual ArrayRecords, and the data partition it said it
        trained on (empty where its reply named none)."""
        check_superlink()
        path = self.dir / "communication.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(["round", "node", *NODE_KEYS, "partition_id", "num_partitions"])
            for node, counts in sorted(per_node.items()):
                partition = partitions.get(node, ("", ""))
                writer.writerow([server_round, node, *(counts[k] for k in NODE_KEYS), *partition])


def _finite(record: dict[str, Any]) -> dict[str, Any]:
    """NaN and infinities as null: JSON has no literal for them."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()
    }


def _peak_rss_mb() -> float:
    """Peak resident memory of this (server) process."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
