"""Load the shipped data sets, and what ``datasets`` loads, as Alpaca-form records.

Every record has ``instruction``, ``input`` and ``output`` strings; Banking77 records also
carry ``label``. Besides the shipped names, a source is a JSON/JSONL file (read here, so that
errors name the line), or a CSV/Parquet file, a ``save_to_disk`` folder, a folder of data
files or a hub id (``task_data.tables``); ``Columns`` maps its columns onto the fields.
Malformed data fails with ``DataError`` naming the source and line or row.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

from task_data.errors import DataError
from task_data.tables import (
    JSON_SUFFIXES,
    TABLE_SUFFIXES,
    looks_like_hub_id,
    table_rows,
    utf8_text,
)

Record = dict[str, str]

BANKING77_INSTRUCTION = (
    "Classify the intent of this banking customer message. Answer with the intent name only."
)


@dataclass(frozen=True)
class Columns:
    """The column holding each record field ('': the field's own name); run-config keys
    ``instruction-column`` and so on. The shipped data sets have their own columns."""

    instruction: str = ""
    input: str = ""
    output: str = ""
    label: str = ""


USUAL_COLUMNS = Columns()


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
    data = require_file(path).read_bytes()
    text = utf8_text(path, gzip.decompress(data) if path.suffix == ".gz" else data)
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


def where_of(path: Path, number: int) -> str:
    """``file line N`` (JSONL) or ``file record N`` (a JSON list), for error messages."""
    return f"{path} {'record' if path.suffix == '.json' else 'line'} {number}"


def read_field(where: str, row: object, name: str, optional: bool = False) -> str:
    """String field ``name`` of ``row``; ``where`` (source and line or row) prefixes errors."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object, got {type(row).__name__}")
    if name not in row or row[name] is None:
        if optional:
            return ""
        raise DataError(f"{where}: missing field {name!r}")
    value = row[name]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {name!r} must be a string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(
            f"{where}: field {name!r} holds a lone surrogate (\\ud800-\\udfff)"
        ) from None
    return value


def to_record(where: str, row: object, columns: Columns) -> Record:
    """An Alpaca record from ``row``: instruction and output required, input and label
    optional unless their column is named."""
    record = {}
    for f in fields(Columns):
        named = getattr(columns, f.name)
        column = named or f.name
        optional = f.name in ("input", "label") and not named
        if isinstance(row, dict) and not optional and row.get(column) is None:
            key = f"{f.name}-column"
            why = f"{key}={named!r}" if named else f"set {key} to the column that holds it"
            raise DataError(
                f"{where}: missing field {column!r} ({why}); it has fields {sorted(row)}"
            )
        value = read_field(where, row, column, optional)
        if value or f.name != "label":
            record[f.name] = value
    return record


def load_alpaca_file(path: Path, columns: Columns = USUAL_COLUMNS) -> list[Record]:
    """A JSON list or JSONL file of instruction/input/output records (input optional; an
    optional ``label`` feeds the Dirichlet and natural partitioners)."""
    return [to_record(where_of(path, n), row, columns) for n, row in json_rows(path)]


def load_table_records(
    name: str, split: str, columns: Columns = USUAL_COLUMNS, subset: str = ""
) -> list[Record]:
    """Records of a source ``datasets`` loads; a column that is not there fails up front,
    naming the columns that are. Numbers (CSV readers type columns) become strings."""
    names, rows = table_rows(name, split, subset)
    for f in fields(Columns):
        named = getattr(columns, f.name)
        if (named or f.name in ("instruction", "output")) and (named or f.name) not in names:
            key = f"{f.name}-column"
            what = f"{key}={named!r} names no column" if named else f"no {f.name!r} column"
            raise DataError(f"{name}: {what}; its columns are {names} (set {key})")
    records = []
    for number, row in enumerate(rows, start=1):
        row = {
            k: str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v
            for k, v in row.items()
        }
        records.append(to_record(f"{name} ({split}) row {number}", row, columns))
    return records


def _gsm8k(root: Path, split: str) -> list[Record]:
    path = root / "gsm8k" / f"{split}.jsonl"
    return [
        {
            "instruction": read_field(where_of(path, n), r, "question"),
            "input": "",
            "output": read_field(where_of(path, n), r, "answer"),
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
        where = where_of(path, number)
        instruction = read_field(where, row, "instruction")
        instances = row.get("instances") if isinstance(row, dict) else None
        if not isinstance(instances, list) or not instances:
            raise DataError(f"{path} line {number}: missing field 'instances'")
        for instance in instances:
            records.append(
                {
                    "instruction": instruction,
                    "input": read_field(where, instance, "input", optional=True),
                    "output": read_field(where, instance, "output"),
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
def _load(
    name: str, split: str, data_dir: str, columns: Columns, subset: str
) -> tuple[Record, ...]:
    if name in _LOADERS:
        splits, loader = _LOADERS[name]
        if split not in splits:
            raise DataError(f"data set {name!r} has no {split!r} split (it has {splits})")
        records = loader(Path(data_dir), split)
        source = f"{name} ({split}) in {data_dir}"
    elif name.endswith(JSON_SUFFIXES):
        if split != "train" or subset:
            what = f"no split {split!r}" if split != "train" else f"no subset {subset!r}"
            raise DataError(f"{name}: {what}; a JSON file has split 'train' only")
        records = load_alpaca_file(Path(name).expanduser(), columns)
        source = name
    elif (
        Path(name).expanduser().exists()
        or name.endswith(tuple(TABLE_SUFFIXES))
        or looks_like_hub_id(name)
    ):
        records, source = load_table_records(name, split, columns, subset), name
    else:
        raise DataError(
            f"unknown data set {name!r}: use one of {', '.join(TASKS)}, a file "
            f"({', '.join((*JSON_SUFFIXES, *TABLE_SUFFIXES))}), a folder, or a hub id owner/name"
        )
    if not records:
        raise DataError(f"{source}: no records")
    return tuple(records)


def load_records(
    name: str,
    split: str = "train",
    data_dir: str | Path | None = None,
    columns: Columns = USUAL_COLUMNS,
    key: str = "",
    subset: str = "",
) -> list[Record]:
    """Records of a shipped data set, a file, a folder or a hub id (cached per process).
    ``key`` (e.g. ``run-config task``) prefixes errors, naming where the source was set;
    ``subset`` is a hub id's (or folder's) configuration. The shipped sets ignore
    ``columns`` and ``subset``."""
    root = Path(data_dir) if data_dir else default_data_dir()
    try:
        return [dict(r) for r in _load(name, split, str(root), columns, subset)]
    except DataError as error:
        raise DataError(f"{key}={name!r}: {error}" if key else str(error)) from None
