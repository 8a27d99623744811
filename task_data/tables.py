"""Rows of what ``datasets`` loads: CSV and Parquet files, folders saved with
``save_to_disk``, folders of data files, and hub ids (where a hub is reachable).

JSON and JSONL files keep the line-numbered reader of ``task_data.sources``: ``datasets``
would lose the line of a malformed record. Every failure is a ``DataError`` naming the source.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import datasets
from datasets import ClassLabel, Dataset, DatasetDict
from datasets.exceptions import DatasetGenerationError

from task_data.errors import DataError

TABLE_SUFFIXES = {".csv": "csv", ".parquet": "parquet"}
JSON_SUFFIXES = (".json", ".jsonl", ".jsonl.gz")
# owner/name, as the Hub spells ids; anything else that is not on disk is no hub id.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

Row = dict[str, object]


def utf8_text(path: Path, data: bytes) -> str:
    """``data`` (the bytes of ``path``) decoded; not UTF-8 fails naming the first bad line,
    which neither ``json`` nor the CSV readers do."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path} line {line}: not UTF-8 (byte 0x{data[err.start]:02x}); save it as UTF-8"
        ) from None


def looks_like_hub_id(name: str) -> bool:
    """``owner/name`` that is no local path: not on disk, no file suffix, no ``./`` or ``~``."""
    return (
        HUB_ID.fullmatch(name) is not None
        and not name.endswith((*TABLE_SUFFIXES, *JSON_SUFFIXES))
        and not Path(name).expanduser().exists()
    )


def _only_train(source: str, split: str) -> None:
    """A file or a saved ``Dataset`` is one split, named 'train' as ``datasets`` names it."""
    if split != "train":
        raise DataError(f"{source}: no split {split!r}; its splits are ['train']")


def _pick(data: Dataset | DatasetDict, source: str, split: str) -> Dataset:
    if isinstance(data, DatasetDict):
        if split not in data:
            raise DataError(f"{source}: no split {split!r}; its splits are {sorted(data)}")
        return data[split]
    _only_train(source, split)
    return data


def _load_dataset(source: str, path: str, split: str, **kwargs: object) -> Dataset:
    try:
        return datasets.load_dataset(path, split=split, **kwargs)
    except ValueError as error:
        if "Unknown split" in str(error):
            raise DataError(f"{source}: no split {split!r} ({error})") from None
        message = " ".join(str(error).split())  # one line, as every data error
        hint = " (set subset)" if "Config name is missing" in message else ""
        raise DataError(f"{source}: {message}{hint}") from None
    except DatasetGenerationError as error:
        raise DataError(f"{source}: cannot be read ({error.__cause__ or error})") from None


def _load_hub(name: str, split: str, subset: str) -> Dataset:
    try:
        return _load_dataset(name, name, split, name=subset or None)
    except ConnectionError as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "")
        raise DataError(
            f"{name}: no such local file or folder, and the Hugging Face Hub cannot be reached "
            f"to load it as a hub id (HF_HUB_OFFLINE={offline or 'unset'}, or no network); "
            f"use a shipped name, a file or a folder ({error})"
        ) from None
    except FileNotFoundError as error:
        raise DataError(f"{name}: no such data set on the Hub ({error})") from None


def _decoded(data: Dataset) -> list[Row]:
    """Rows with class-label columns as their names (``PolyAI/banking77``'s ``label``)."""
    rows = data.to_list()
    for column, feature in data.features.items():
        if isinstance(feature, ClassLabel):
            for row in rows:
                if isinstance(row[column], int) and row[column] >= 0:
                    row[column] = feature.int2str(row[column])
    return rows


def _no_subset(source: str, subset: str, kind: str) -> None:
    if subset:
        raise DataError(
            f"{source}: subset={subset!r} names a configuration of a hub id or of a folder "
            f"that declares them; a {kind} has none"
        )


def table_rows(name: str, split: str, subset: str = "") -> tuple[list[str], list[Row]]:
    """Column names and rows of split ``split`` of a CSV/Parquet file, a folder (saved with
    ``save_to_disk``, or of data files) or a hub id; ``subset``: the configuration (hub ids
    and folders that declare configurations, e.g. ``main`` of ``openai/gsm8k``)."""
    path = Path(name).expanduser()
    if path.is_dir():
        saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
        if saved:
            _no_subset(name, subset, "save_to_disk folder")
            data = _pick(datasets.load_from_disk(str(path)), name, split)
        else:
            data = _load_dataset(name, str(path), split, name=subset or None)
    elif path.is_file():
        _no_subset(name, subset, "file")
        builder = TABLE_SUFFIXES.get(path.suffix)
        if builder is None:
            known = ", ".join((*JSON_SUFFIXES, *TABLE_SUFFIXES))
            raise DataError(f"{name}: unknown file type {path.suffix!r}; use one of {known}")
        if builder == "csv":
            utf8_text(path, path.read_bytes())
        _only_train(name, split)
        data = _load_dataset(name, builder, "train", data_files=str(path))
    elif looks_like_hub_id(name):
        data = _load_hub(name, split, subset)
    else:
        raise DataError(f"{name}: no such file or folder")
    return list(data.column_names), _decoded(data)
