"""The shared weight store on real files and real processes: concurrent writers end with one
verified entry, a corrupted shared entry is refused and replaced, the size limit evicts the
least recently used entries no run uses, and an ephemeral run removes what only it used."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file, save_file

from client_app.model_cache import CacheError, load_client_model, store_package, verify_entry
from client_app.model_offer import offer_reply
from client_app.weight_store import StorePlace, evict, mark_use, release, release_reply, store_id
from federation.messages import OFFER_QUERY, OFFER_RECORD, PRESENT_KEY, RELEASE_QUERY, STORE_KEY
from models.blocks import get_blocks
from models.fedbiot_models import FedBiOTModels
from models.layout import fedbiot_layout
from models.lora import LoraSpec
from models.wire import from_record, to_record
from tests.tiny import tiny

SPEC = LoraSpec(r=5, alpha=10, dropout=0.0)


@pytest.fixture(scope="module")
def pair() -> FedBiOTModels:
    model, tokenizer = tiny("tiny-llama")
    layout = fedbiot_layout(len(get_blocks(model)), 2, 0.5)
    return FedBiOTModels(model, tokenizer, layout, LoraSpec(r=4, alpha=8, dropout=0.0))


def _fresh_process_view(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("client_app.model_cache._VERIFIED", {})
    monkeypatch.setattr("client_app.model_cache._MEMO", {})


def _write_from_file(source: str, package: dict, store: str, barrier: object) -> None:
    """One writer process: the received weights, stored once every writer is ready."""
    record = to_record(load_file(source))
    barrier.wait()  # type: ignore[attr-defined]
    store_package(Path(store), record, ConfigRecord(package))


def test_two_processes_writing_one_digest_end_with_one_verified_entry(
    pair: FedBiOTModels, tmp_path: Path
) -> None:
    source = tmp_path / "received.safetensors"
    save_file({k: v.contiguous() for k, v in from_record(pair.frozen).items()}, source)
    package = dict(pair.model_package().items())
    store = tmp_path / "weights"
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    writers = [
        context.Process(target=_write_from_file, args=(str(source), package, str(store), barrier))
        for _ in range(2)
    ]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(300)
    assert [w.exitcode for w in writers] == [0, 0]
    entries = [p for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert entries == [store / pair.frozen_digest]
    assert not [p for p in store.iterdir() if p.is_dir() and p.name.startswith(".")]  # no temp
    verify_entry(entries[0], pair.frozen_digest)  # whole: every file hashes to the manifest


def _context(node_id: int, node_config: dict, run_id: int = 5, **run_config: object) -> Context:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, 1
    return Context(
        run_id=run_id,
        node_id=node_id,
        node_config={"partition-id": 0, "num-partitions": 2, **node_config},
        state=RecordDict(),
        run_config=dict(run_config),
    )


def _offer(pair: FedBiOTModels, context: Context, with_weights: bool) -> ConfigRecord:
    content = RecordDict({"config": ConfigRecord({"model-digest": pair.frozen_digest})})
    if with_weights:
        content["base"] = pair.frozen
        content["model-package"] = pair.model_package()
    query = Message(content, dst_node_id=context.node_id, message_type=OFFER_QUERY)
    return offer_reply(query, context).content[OFFER_RECORD]


def test_nodes_share_one_store_and_a_corrupted_entry_is_refused_then_replaced(
    pair: FedBiOTModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = (_context(n, {"cache-dir": str(tmp_path)}) for n in (11, 12))
    assert _offer(pair, first, with_weights=False)[PRESENT_KEY] == ""
    answer = _offer(pair, first, with_weights=True)
    assert answer[PRESENT_KEY] == pair.frozen_digest
    # The second node holds the first one's copy: the same store, one entry on disk.
    again = _offer(pair, second, with_weights=False)
    assert again[PRESENT_KEY] == pair.frozen_digest and again[STORE_KEY] == answer[STORE_KEY]
    store = tmp_path / "weights"
    assert [p.name for p in store.iterdir() if not p.name.startswith(".")] == [pair.frozen_digest]
    assert not (tmp_path / "nodes").exists()
    # Flipped bytes in the shared entry: refused naming the path, then replaced.
    weights = store / pair.frozen_digest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    _fresh_process_view(monkeypatch)
    with pytest.raises(CacheError, match=f"cached model at {store / pair.frozen_digest} is bad"):
        load_client_model(store, pair.frozen_digest, SPEC)
    assert _offer(pair, second, with_weights=False)[PRESENT_KEY] == ""  # asks for the weights
    assert _offer(pair, second, with_weights=True)[PRESENT_KEY] == pair.frozen_digest
    load_client_model(store, pair.frozen_digest, SPEC)


def test_a_node_that_must_not_share_keeps_its_own_folder(
    pair: FedBiOTModels, tmp_path: Path
) -> None:
    shared = _context(11, {"cache-dir": str(tmp_path)})
    _offer(pair, shared, with_weights=True)
    alone = _context(12, {"cache-dir": str(tmp_path), "shared-cache": "false"})
    answer = _offer(pair, alone, with_weights=False)
    assert answer[PRESENT_KEY] == "" and answer[STORE_KEY] == ""  # never the shared copy
    _offer(pair, alone, with_weights=True)
    assert (tmp_path / "nodes" / "12" / pair.frozen_digest).is_dir()
    with pytest.raises(ValueError, match="node 13: node config shared-cache='maybe'"):
        _offer(pair, _context(13, {"cache-dir": str(tmp_path), "shared-cache": "maybe"}), False)


def _entry(store: Path, name: str, size: int, used_at: float, run_id: int = 1) -> str:
    """A stored entry of ``size`` bytes last used at ``used_at``, by a run that ended."""
    digest = name * 64
    (store / digest).mkdir(parents=True)
    (store / digest / "model.safetensors").write_bytes(b"\0" * size)
    mark_use(store, digest, run_id)
    (store / ".meta" / digest / f"run-{run_id}").unlink()
    os.utime(store / ".meta" / digest / "last-use", (used_at, used_at))
    return digest


def test_eviction_removes_least_recently_used_entries_and_keeps_those_in_use(
    tmp_path: Path,
) -> None:
    now = time.time()
    oldest, old, recent, newest = (
        _entry(tmp_path, c, 1000, now - age)
        for c, age in zip("abcd", (400, 300, 200, 100), strict=True)
    )
    mark_use(tmp_path, old, run_id=9)  # this run loads it now: in use, and used last
    os.utime(tmp_path / ".meta" / old / "last-use", (now - 300, now - 300))
    assert evict(tmp_path, limit=0) == []  # 0: no limit
    assert evict(tmp_path, limit=2500) == [oldest, recent]  # old is in use, so skipped
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        old,
        newest,
    ]
    assert evict(tmp_path, limit=500) == [newest]  # over the limit, but old is in use...
    release(StorePlace(tmp_path, shared=True), 9, ephemeral=False)
    assert evict(tmp_path, limit=500) == [old]  # ...until the run released it


def test_the_store_limit_applies_when_weights_arrive(pair: FedBiOTModels, tmp_path: Path) -> None:
    store = tmp_path / "weights"
    stale = _entry(store, "e", 10_000, time.time() - 1000)
    _offer(pair, _context(11, {"cache-dir": str(tmp_path), "cache-max-gb": 1e-6}), True)
    assert not (store / stale).exists() and (store / pair.frozen_digest).is_dir()


def test_an_ephemeral_run_removes_only_what_it_used(pair: FedBiOTModels, tmp_path: Path) -> None:
    store = tmp_path / "weights"
    kept = _entry(store, "f", 100, time.time())  # an earlier run's
    ephemeral = {"cache-ephemeral": 1}
    shared = _context(11, {"cache-dir": str(tmp_path)}, 7, **ephemeral)
    alone = _context(12, {"cache-dir": str(tmp_path), "shared-cache": "false"}, 7, **ephemeral)
    for context in (shared, alone):
        _offer(pair, context, with_weights=True)
    for context in (shared, alone):
        end = Message(RecordDict(), dst_node_id=context.node_id, message_type=RELEASE_QUERY)
        release_reply(end, context)
    assert not (store / pair.frozen_digest).exists() and (store / kept).is_dir()
    assert not (tmp_path / "nodes" / "12").exists()
    assert store_id(store)  # the store itself stays, with its id
