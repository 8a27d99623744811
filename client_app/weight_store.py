"""Where a node keeps the frozen weights: one shared, bounded store per host.

Nodes on one machine share ``<cache>/weights/<sha256>/`` (content-addressed: the entry of a
digest holds only weights that hash to it, so sharing never hands a node a weight the server
did not name for it); a node with node config ``shared-cache=false`` keeps its own
``<cache>/nodes/<node-id>/``. ``<cache>`` is node config ``cache-dir``, else run config
``cache-dir``, else ``$FEDBIOT_CACHE``, else ``~/.cache/fedbiot``.

Beside the entries, ``.meta/<sha256>/`` records their use: ``last-use`` (touched on every use:
the least-recently-used order), ``run-<id>`` (the entry is in use by run ``id``; removed when
the run releases the cache) and ``created-<id>`` (run ``id`` wrote it). A size limit
(``cache-max-gb``) evicts the least recently used entries no run is using; a run with
``cache-ephemeral=true`` removes at its end the node folder and the shared entries only it
used. Writers serialize on ``fcntl.flock`` of a lock file: the standard library's advisory
lock is all a store on one local file system needs, so no locking package is added.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.common.logger import log

from federation.run_config import RunConfig
from models.cache_dir import cache_root

ENTRY = re.compile(r"[0-9a-f]{64}")
META = ".meta"
HOST_ID = ".store-id"
# An in-use mark older than this is a crashed run's: it no longer protects the entry.
STALE_MARK_S = 24 * 3600.0


@dataclass(frozen=True)
class StorePlace:
    """A node's store: the folder of its entries, and whether other nodes share it."""

    root: Path
    shared: bool


def _flag(value: object, key: str, node_id: int) -> bool:
    text = str(value).strip().lower()
    if text in ("true", "1"):
        return True
    if text in ("false", "0"):
        return False
    raise ValueError(f"node {node_id}: node config {key}={value!r} is not true or false")


def store_place(node_config: Mapping[str, Any], run_cache_dir: str, node_id: int) -> StorePlace:
    """The node's store from its node config (``cache-dir``, ``shared-cache``) and the run's."""
    root = str(node_config.get("cache-dir", "") or run_cache_dir)
    base = Path(root).expanduser() if root else cache_root()
    if _flag(node_config.get("shared-cache", True), "shared-cache", node_id):
        return StorePlace(base / "weights", shared=True)
    return StorePlace(base / "nodes" / str(node_id), shared=False)


def max_bytes(node_config: Mapping[str, Any], run_max_gb: float, node_id: int) -> int:
    """The store's size limit in bytes (0: none): node config ``cache-max-gb`` over the run's."""
    value = node_config.get("cache-max-gb", run_max_gb)
    try:
        gb = float(value)
    except (TypeError, ValueError):
        gb = -1.0
    if not gb >= 0:
        raise ValueError(f"node {node_id}: cache-max-gb={value!r} is not a number >= 0")
    return int(gb * 1e9)


@contextmanager
def locked(store: Path, name: str) -> Iterator[None]:
    """Hold an exclusive lock on ``store/.<name>.lock`` (released when the process dies)."""
    store.mkdir(parents=True, exist_ok=True)
    with open(store / f".{name}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def store_id(store: Path) -> str:
    """A random id of the store, made once: nodes that report the same id share it."""
    path = store / HOST_ID
    with locked(store, "store-id"):
        if not path.is_file():
            tmp = store / f".{HOST_ID}-{uuid.uuid4().hex}"
            tmp.write_text(uuid.uuid4().hex)
            os.replace(tmp, path)
        return path.read_text().strip()


def _meta(store: Path, digest: str) -> Path:
    return store / META / digest


def mark_use(store: Path, digest: str, run_id: int, created: bool = False) -> None:
    """Record that run ``run_id`` uses the entry now (and wrote it, if ``created``)."""
    meta = _meta(store, digest)
    meta.mkdir(parents=True, exist_ok=True)
    names = ["last-use", f"run-{run_id}"] + ([f"created-{run_id}"] if created else [])
    for name in names:
        (meta / name).touch()  # an existing file's mtime becomes now


def _mtime(path: Path) -> float:
    """0 for a file that is gone (another run may release its mark at any time)."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _in_use(store: Path, digest: str, now: float) -> bool:
    marks = _meta(store, digest).glob("run-*")
    return any(now - _mtime(m) < STALE_MARK_S for m in marks)


def _last_use(store: Path, digest: str) -> float:
    return _mtime(_meta(store, digest) / "last-use")


def _size(entry: Path) -> int:
    return sum(p.stat().st_size for p in entry.iterdir() if p.is_file())


def remove_entry(store: Path, digest: str) -> None:
    """Rename the entry away, then delete it: a reader never sees half an entry."""
    entry = store / digest
    if entry.is_dir():
        gone = store / f".{digest}-gone-{uuid.uuid4().hex}"
        os.rename(entry, gone)
        shutil.rmtree(gone, ignore_errors=True)
    shutil.rmtree(_meta(store, digest), ignore_errors=True)


def evict(store: Path, limit: int) -> list[str]:
    """Remove least recently used entries no run uses until the store fits ``limit`` bytes
    (0: no limit); return the digests removed."""
    if limit <= 0 or not store.is_dir():
        return []
    with locked(store, "store"):
        now = time.time()
        entries = {p.name: _size(p) for p in store.iterdir() if ENTRY.fullmatch(p.name)}
        total = sum(entries.values())
        removed = []
        for digest in sorted(entries, key=lambda d: _last_use(store, d)):
            if total <= limit:
                break
            if _in_use(store, digest, now):
                continue
            remove_entry(store, digest)
            total -= entries[digest]
            removed.append(digest)
    if removed:
        log(INFO, "Cache %s over %d bytes: evicted %s", store, limit, ", ".join(removed))
    return removed


def release(place: StorePlace, run_id: int, ephemeral: bool) -> None:
    """The run ended: drop its in-use marks; if ``ephemeral``, remove a node folder and the
    shared entries this run wrote that no other run uses."""
    if not place.root.is_dir():
        return
    if ephemeral and not place.shared:
        shutil.rmtree(place.root, ignore_errors=True)
        return
    with locked(place.root, "store"):
        now = time.time()
        for meta in sorted((place.root / META).glob("*")):
            (meta / f"run-{run_id}").unlink(missing_ok=True)
            created = meta / f"created-{run_id}"
            if ephemeral and created.exists() and not _in_use(place.root, meta.name, now):
                remove_entry(place.root, meta.name)
            elif not (place.root / meta.name).is_dir() and not any(meta.glob("run-*")):
                shutil.rmtree(meta, ignore_errors=True)  # offered, never stored


def release_reply(msg: Message, context: Context) -> Message:
    """The run ended: drop its marks on the node's store (and, with ``cache-ephemeral=1``,
    what only this run used). Answered without torch: a deployed SuperNode starts a process
    for this message."""
    config = RunConfig.from_flower(context.run_config)
    place = store_place(context.node_config, config.cache_dir, context.node_id)
    release(place, context.run_id, bool(config.cache_ephemeral))
    return Message(RecordDict(), reply_to=msg)
