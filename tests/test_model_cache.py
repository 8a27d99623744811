"""A node's model cache on real files: bad bytes never load, re-sent weights replace them,
and names a message carries never write outside the cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client_app.model_cache import (
    _VERIFIED,
    MANIFEST,
    WEIGHTS,
    CacheError,
    load_client_model,
    store_package,
    verify_entry,
)
from client_app.node import load_node
from models.blocks import get_blocks
from models.fedbiot_models import FedBiOTModels
from models.layout import fedbiot_layout
from models.lora import LoraSpec
from models.wire import to_record
from tests.tiny import tiny

# A spec no other test loads, so the process memo never answers in place of the disk.
SPEC = LoraSpec(r=3, alpha=6, dropout=0.0)


@pytest.fixture(scope="module")
def pair() -> FedBiOTModels:
    model, tokenizer = tiny("tiny-llama")
    layout = fedbiot_layout(len(get_blocks(model)), 2, 0.5)
    return FedBiOTModels(model, tokenizer, layout, LoraSpec(r=4, alpha=8, dropout=0.0))


def _flip(path: Path, offset: int, count: int = 64) -> None:
    data = bytearray(path.read_bytes())
    for i in range(offset, offset + count):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _fresh_process_view(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a new client process sees: nothing verified or loaded yet."""
    monkeypatch.setattr("client_app.model_cache._VERIFIED", {})
    monkeypatch.setattr("client_app.model_cache._MEMO", {})


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_digest_is_the_full_sha256(pair: FedBiOTModels) -> None:
    assert len(pair.frozen_digest) == 64
    assert pair.model_package()["digest"] == pair.frozen_digest


def test_flipped_weight_bytes_are_refused_and_resent_weights_replace_them(
    pair: FedBiOTModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = store_package(tmp_path, pair.frozen, pair.model_package())
    weights = entry / WEIGHTS
    _flip(weights, weights.stat().st_size // 2)
    _fresh_process_view(monkeypatch)
    with pytest.raises(CacheError, match=f"cached model at {entry} is bad.*{WEIGHTS} does not"):
        load_client_model(tmp_path, pair.frozen_digest, SPEC)
    # The server re-sends the weights after the failed reply: the entry is replaced.
    assert store_package(tmp_path, pair.frozen, pair.model_package()) == entry
    client = load_client_model(tmp_path, pair.frozen_digest, SPEC)
    ids = torch.randint(5, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    pair.compressed.peft.eval()
    with torch.no_grad():  # every LoRA B is zero, so both are the frozen weights
        torch.testing.assert_close(client.lora.peft(ids).logits, pair.compressed.peft(ids).logits)
    assert not [p for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith(".")]  # no temp


@pytest.mark.parametrize("damage", ["truncated-weights", "missing-tokenizer", "tokenizer-flip"])
def test_a_truncated_or_altered_folder_is_refused_then_replaced(
    damage: str, pair: FedBiOTModels, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = store_package(tmp_path, pair.frozen, pair.model_package())
    if damage == "truncated-weights":
        (entry / WEIGHTS).write_bytes((entry / WEIGHTS).read_bytes()[:1000])
    elif damage == "missing-tokenizer":
        (entry / "tokenizer.json").unlink()
    else:
        _flip(entry / "tokenizer.json", 10, 4)
    _fresh_process_view(monkeypatch)
    with pytest.raises(CacheError, match=f"cached model at {entry} is bad"):
        load_client_model(tmp_path, pair.frozen_digest, SPEC)
    store_package(tmp_path, pair.frozen, pair.model_package())
    _fresh_process_view(monkeypatch)
    client = load_client_model(tmp_path, pair.frozen_digest, SPEC)
    assert client.tokenizer.eos_token == pair.tokenizer.eos_token


def test_received_weights_that_miss_their_digest_are_not_stored(
    pair: FedBiOTModels, tmp_path: Path
) -> None:
    package = pair.model_package()
    package["digest"] = "f" * 64
    with pytest.raises(CacheError, match=r"do not hash to their digest f{64}; not stored"):
        store_package(tmp_path, pair.frozen, package)
    assert _files(tmp_path) == set()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("digest", "../../../../x", "'digest'='../../../../x' is not a 64-character"),
        ("digest", "A" * 64, "is not a 64-character lowercase hex"),
        ("tokenizer-files", '["../../x"]', "'tokenizer-files': '../../x' is not a plain"),
        ("tokenizer-files", '["/etc/x"]', "'/etc/x' is not a plain file name"),
        ("tokenizer-files", '[".bashrc"]', "'.bashrc' is not a plain file name"),
        ("tokenizer-files", '["config.json"]', "would overwrite the node's own config.json"),
        ("tokenizer-files", '{"a": 1}', "'tokenizer-files': not a JSON list"),
    ],
)
def test_a_server_sent_name_that_is_not_plain_is_refused_and_nothing_is_written(
    key: str, value: str, message: str, pair: FedBiOTModels, tmp_path: Path
) -> None:
    cache = tmp_path / "nodes" / "7"
    package = pair.model_package()
    package[key] = value
    for name in json.loads(value) if value.startswith("[") else []:
        package[f"tokenizer:{name}"] = b"written outside"
    with pytest.raises(CacheError, match=message):
        store_package(cache, pair.frozen, package)
    assert _files(tmp_path) == set()


def test_a_message_naming_a_bad_digest_fails_with_the_node_and_key(
    pair: FedBiOTModels, tmp_path: Path
) -> None:
    """Through the client's real entry point: the error names the node and the key."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    content = RecordDict(
        {
            "arrays": to_record(pair.adapter_state()),
            "config": ConfigRecord({"model-digest": "../x"}),
        }
    )
    msg = Message(content=content, dst_node_id=11, message_type="train")
    context = Context(
        run_id=1,
        node_id=11,
        node_config={"cache-dir": str(tmp_path), "partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config={},
    )
    with pytest.raises(CacheError, match=r"node 11: config key 'model-digest'='\.\./x' is not"):
        load_node(msg, context)
    assert _files(tmp_path) == set()


def test_a_stored_entry_is_hashed_once_per_process(pair: FedBiOTModels, tmp_path: Path) -> None:
    """Written and verified in one go; a later load trusts it while its files are unchanged,
    and checks it again once any file's size or mtime moves."""
    entry = store_package(tmp_path, pair.frozen, pair.model_package())
    manifest = json.loads((entry / MANIFEST).read_text())
    assert WEIGHTS not in manifest and "tokenizer.json" in manifest
    assert str(entry) in _VERIFIED
    (entry / "config.json").write_text("{}")
    with pytest.raises(CacheError, match=r"config\.json does not match its SHA-256"):
        verify_entry(entry, pair.frozen_digest)
