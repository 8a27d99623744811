"""Load the shipped data sets (and a node's own JSON/JSONL file) as Alpaca-form records.

Every record has ``instruction``, ``input`` and ``output`` strings; Banking77 records also
carry ``label``. Malformed files fail with ``DataError`` naming the file and line.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path

Record = dict[str, str]

BANKING77_INSTRUCTION = (
    "Classify the intent of this banking customer message. Answer with the intent name only."
)


class DataError(ValueError):
    """A data file is missing, unreadable or malformed; the message names file and line."""


def default_data_dir() -> Path:
    """``$FEDBIOT_DATA_DIR``, else the repository's ``data/``."""
    env = os.environ.get("FEDBIOT_DATA_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "data"


def require_file(path: Path) -> Path:
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    return path


def json_rows(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, row) for a JSON list, a JSONL file or a gzipped JSONL file."""
    require_file(path)
    if path.suffix == ".gz":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            text = f.read()
    else:
        text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {err.lineno}: invalid JSON ({err.msg})") from err
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of records")
        yield from enumerate(rows, start=1)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {number}: invalid JSON ({err.msg})") from err


def read_field(path: Path, number: int, row: object, name: str, optional: bool = False) -> str:
    where = f"{path} {'record' if path.suffix == '.json' else 'line'} {number}"
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    if name not in row or row[name] is None:
        if optional:
            return ""
        raise DataError(f"{where}: missing field {name!r}")
    value = row[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string")
    return value


def load_alpaca_file(path: Path) -> list[Record]:
    """A JSON list or JSONL file of instruction/input/output records (input optional; an
    optional ``label`` feeds the Dirichlet and natural partitioners)."""
    records = []
    for n, row in json_rows(path):
        record = {
            "instruction": read_field(path, n, row, "instruction"),
            "input": read_field(path, n, row, "input", optional=True),
            "output": read_field(path, n, row, "output"),
        }
        label = read_field(path, n, row, "label", optional=True)
        if label:
            record["label"] = label
        records.append(record)
    return records


def _gsm8k(root: Path, split: str) -> list[Record]:
    path = root / "gsm8k" / f"{split}.jsonl"
    return [
        {
            "instruction": read_field(path, n, r, "question"),
            "input": "",
            "output": read_field(path, n, r, "answer"),
        }
        for n, r in json_rows(path)
    ]


def _banking77(root: Path, split: str) -> list[Record]:
    path = require_file(root / "banking77" / f"{split}.csv")
    records = []
    with open(path, newline="", encoding="utf-8") as f:
        for number, row in enumerate(csv.DictReader(f), start=2):
            text, label = row.get("text"), row.get("category")
            if not text or not label:
                raise DataError(f"{path} line {number}: needs non-empty 'text' and 'category'")
            records.append(
                {
                    "instruction": BANKING77_INSTRUCTION,
                    "input": text,
                    "output": label,
                    "label": label,
                }
            )
    return records


def _instances(root: Path, relative: str) -> list[Record]:
    """Self-Instruct style files: one instruction with several input/output instances."""
    path = root / relative
    records = []
    for number, row in json_rows(path):
        instruction = read_field(path, number, row, "instruction")
        instances = row.get("instances") if isinstance(row, dict) else None
        if not isinstance(instances, list) or not instances:
            raise DataError(f"{path} line {number}: missing field 'instances'")
        for instance in instances:
            records.append(
                {
                    "instruction": instruction,
                    "input": read_field(path, number, instance, "input", optional=True),
                    "output": read_field(path, number, instance, "output"),
                }
            )
    return records


_LOADERS: dict[str, tuple[tuple[str, ...], Callable[[Path, str], list[Record]]]] = {
    "gsm8k": (("train", "test"), _gsm8k),
    "banking77": (("train", "test"), _banking77),
    "gpteacher": (
        ("train",),
        lambda root, _: load_alpaca_file(root / "gpteacher" / "roleplay.json"),
    ),
    "code-alpaca": (
        ("train",),
        lambda root, _: load_alpaca_file(root / "code_alpaca" / "code_alpaca_2k.json"),
    ),
    "alpaca-seed": (("train",), lambda root, _: _instances(root, "alpaca_seed/seed_tasks.jsonl")),
    "gpt4-user": (
        ("train",),
        lambda root, _: _instances(root, "gpt4_llm/user_oriented_instructions.jsonl"),
    ),
}
TASKS = tuple(_LOADERS)


@lru_cache(maxsize=16)
def _load(name: str, split: str, data_dir: str) -> tuple[Record, ...]:
    if name in _LOADERS:
        splits, loader = _LOADERS[name]
        if split not in splits:
            raise ValueError(f"data set {name!r} has no {split!r} split (it has {splits})")
        records = loader(Path(data_dir), split)
        source = f"{name} ({split}) in {data_dir}"
    elif name.endswith((".json", ".jsonl")):
        records = load_alpaca_file(Path(name).expanduser())
        source = name
    else:
        raise ValueError(
            f"unknown data set {name!r}: use one of {', '.join(TASKS)} "
            "or a path to a .json/.jsonl file of instruction/input/output records"
        )
    if not records:
        raise DataError(f"{source}: no records")
    return tuple(records)


def load_records(
    name: str, split: str = "train", data_dir: str | Path | None = None
) -> list[Record]:
    """Records of a shipped data set or of a local file (cached per process)."""
    root = Path(data_dir) if data_dir else default_data_dir()
    return [dict(r) for r in _load(name, split, str(root))]
