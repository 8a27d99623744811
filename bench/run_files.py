"""The two files every bench reads back from a run folder, ``metrics.jsonl`` and
``config.json``, read once here so that a truncated or hand-edited one stops the bench with
the file (and line) named instead of a bare ``JSONDecodeError`` or ``KeyError`` from
wherever it was first indexed: a sweep or claims part can run on another machine, and its
run folders come back as files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def metrics_rows(run_dir: Path, *, missing_ok: bool = False) -> list[dict[str, Any]]:
    """The rounds of ``run_dir/metrics.jsonl``, each an object with an integer ``round``
    (blank lines skipped); ``[]`` for a missing file when ``missing_ok`` (a run not started)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        if missing_ok:
            return []
        raise SystemExit(f"{path}: no such file (is {run_dir} a finished run folder?)")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise SystemExit(f"{path}, line {number}: not JSON ({error})") from None
        if not isinstance(row, dict) or type(row.get("round")) is not int:
            raise SystemExit(f"{path}, line {number}: not a round's row (no integer 'round')")
        rows.append(row)
    return rows


def run_config(run_dir: Path) -> dict[str, Any]:
    """The ``run_config`` object of ``run_dir/config.json``."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise SystemExit(f"{path}: no such file (is {run_dir} a run folder?)")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise SystemExit(f"{path}: not JSON ({error})") from None
    settings = config.get("run_config") if isinstance(config, dict) else None
    if not isinstance(settings, dict):
        raise SystemExit(f"{path}: no 'run_config' object, not a run's config.json")
    return settings
