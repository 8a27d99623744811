"""The two files every bench reads back from a run folder, ``metrics.jsonl`` and
``config.json``, read once here so that a truncated or hand-edited one stops the bench with
the file (and line) named instead of a bare ``JSONDecodeError`` or ``KeyError`` from
wherever it was first indexed: a sweep or claims part can run on another machine, and its
run folders come back as files."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def jsonl_rows(path: Path, problem_of: Callable[[Any], str | None], what: str) -> list[Any]:
    """The rows of the JSON-lines file ``path`` (blank lines skipped); a line that is not
    JSON, or whose row ``problem_of`` finds a problem with, stops the bench naming the file,
    the line and ``what`` the row should have been."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise SystemExit(f"{path}, line {number}: not JSON ({error})") from None
        problem = problem_of(row)
        if problem:
            raise SystemExit(f"{path}, line {number}: not {what} ({problem})")
        rows.append(row)
    return rows


def _round_problem(row: Any) -> str | None:
    ok = isinstance(row, dict) and type(row.get("round")) is int
    return None if ok else "no integer 'round'"


def metrics_rows(run_dir: Path, *, missing_ok: bool = False) -> list[dict[str, Any]]:
    """The rounds of ``run_dir/metrics.jsonl``, each an object with an integer ``round``
    (blank lines skipped); ``[]`` for a missing file when ``missing_ok`` (a run not started)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        if missing_ok:
            return []
        raise SystemExit(f"{path}: no such file (is {run_dir} a finished run folder?)")
    return jsonl_rows(path, _round_problem, "a round's row")


def run_config(run_dir: Path, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """The ``run_config`` object of ``run_dir/config.json``, which must hold the keys in
    ``required`` (those a bench reads; a file from an older version may lack them)."""
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
    missing = [key for key in required if key not in settings]
    if missing:
        raise SystemExit(f"{path}: run_config has no {', '.join(map(repr, missing))}")
    return settings
