"""The compressed model on a client: stored once per store, rebuilt from disk afterwards.

The server sends the compressed frozen weights (``base`` ArrayRecord) and a model package
(config, layout, tokenizer) the first time it samples a node whose store lacks them. The node
writes them as an ordinary Hugging Face model directory in its store (shared by the nodes of
a host, see ``weight_store``), keyed by the weights' digest; every later round sends only
LoRA and names the digest. A process-level memo keeps the last model
in memory, so simulated clients sharing a worker do not reload it every round.

The digest is the full SHA-256 of the weights (``models.wire.state_digest``). A node hashes
what it receives before writing it, and checks a stored entry once per process before loading
it (the weights against the digest, every other file against the entry's manifest), so flipped
bytes or a truncated folder never load: the reply fails, the server re-sends the weights, and
the bad entry is replaced atomically. Names a message carries (the digest, tokenizer file
names) become paths, so they are checked before any file is written.

Storing and checking need torch and safetensors only; ``load_client_model`` imports
transformers and peft where it runs, so that a SuperNode answering the model offer (one
process per message) does not spend seconds importing them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.common.logger import log
from safetensors import safe_open
from safetensors.torch import save_file

from client_app.weight_store import locked
from models.layout import Layout
from models.wire import from_record, state_digest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from models.lora import LoraModel, LoraSpec


class MissingBaseError(RuntimeError):
    """The node has no cached copy of the compressed weights it was asked to use."""


class CacheError(RuntimeError):
    """A received package or a stored entry that must not be used (bad name, bad bytes)."""


DIGEST = re.compile(r"[0-9a-f]{64}")
# A plain file name: no separator, no "..", no leading dot, bounded length.
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*")
WEIGHTS = "model.safetensors"
MANIFEST = "fedbiot_manifest.json"
OWN_FILES = frozenset({WEIGHTS, MANIFEST, "config.json", "fedbiot_layout.json"})


@dataclass
class ClientModel:
    """A client's compressed model with LoRA on every block, and its tokenizer."""

    lora: LoraModel
    tokenizer: PreTrainedTokenizerBase
    layout: Layout
    quantization: str = "none"
    quantization_note: str = ""


_MEMO: dict[tuple[str, LoraSpec, str, torch.dtype], ClientModel] = {}
# Entries hashed in this process, with the (name, mtime, size) of their files when they were.
_VERIFIED: dict[str, tuple[tuple[str, int, int], ...]] = {}


def checked_digest(value: object, key: str) -> str:
    """``value`` if it is a full SHA-256 in lowercase hex; it names a cache folder."""
    if not isinstance(value, str) or not DIGEST.fullmatch(value):
        raise CacheError(f"{key}={str(value)[:80]!r} is not a 64-character lowercase hex digest")
    return value


def tokenizer_names(package: ConfigRecord) -> list[str]:
    """The package's tokenizer file names, each a plain file name with its bytes present."""
    key = "model-package key 'tokenizer-files'"
    try:
        names = json.loads(str(package["tokenizer-files"]))
    except (KeyError, json.JSONDecodeError) as err:
        raise CacheError(f"{key}: not a JSON list ({err})") from err
    if not isinstance(names, list):
        raise CacheError(f"{key}: not a JSON list")
    for name in names:
        if not isinstance(name, str) or len(name) > 128 or not FILE_NAME.fullmatch(name):
            raise CacheError(f"{key}: {str(name)[:80]!r} is not a plain file name")
        if name in OWN_FILES:
            raise CacheError(f"{key}: {name!r} would overwrite the node's own {name}")
        if f"tokenizer:{name}" not in package:
            raise CacheError(f"{key}: {name!r} has no 'tokenizer:{name}' bytes")
    return names


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _signature(directory: Path) -> tuple[tuple[str, int, int], ...]:
    stats = ((p.name, p.stat()) for p in directory.iterdir())
    return tuple(sorted((name, st.st_mtime_ns, st.st_size) for name, st in stats))


def verify_entry(directory: Path, digest: str) -> None:
    """Raise CacheError unless the weights hash to ``digest`` and every other file to the
    manifest; hashes once per process while the files' mtimes and sizes stay the same."""
    try:
        signature = _signature(directory)
        if _VERIFIED.get(str(directory)) == signature:
            return
        manifest = json.loads((directory / MANIFEST).read_text())
        for name, expected in manifest.items():
            if not FILE_NAME.fullmatch(name) or _sha256(directory / name) != expected:
                raise CacheError(f"{name} does not match its SHA-256 in {MANIFEST}")
        with safe_open(str(directory / WEIGHTS), framework="pt") as weights:
            stored = {name: weights.get_tensor(name) for name in weights.keys()}  # noqa: SIM118
        if state_digest(stored) != digest:
            raise CacheError(f"{WEIGHTS} does not hash to the digest {digest}")
    except CacheError:
        raise
    except Exception as err:  # unreadable, truncated or missing files, a bad manifest
        raise CacheError(f"unreadable ({type(err).__name__}: {err})") from err
    _VERIFIED[str(directory)] = signature


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def store_package(cache: Path, base: ArrayRecord, package: ConfigRecord) -> Path:
    """Write the received weights and package as a model directory; return its path.

    A verified entry is kept; a bad one (flipped bytes, truncated) is replaced: the new entry
    is written to a temporary folder and renamed into place, under the digest's lock, so
    concurrent writers (nodes sharing the store) end with one whole entry.
    """
    digest = checked_digest(package.get("digest"), "model-package key 'digest'")
    names = tokenizer_names(package)
    tensors = {k: v.contiguous() for k, v in from_record(base).items()}
    if state_digest(tensors) != digest:
        raise CacheError(f"the weights received do not hash to their digest {digest}; not stored")
    with locked(cache, digest):  # a second writer of the digest waits, then keeps this entry
        return _store_locked(cache, digest, names, tensors, package)


def _store_locked(
    cache: Path,
    digest: str,
    names: list[str],
    tensors: dict[str, torch.Tensor],
    package: ConfigRecord,
) -> Path:
    target = cache / digest
    if target.exists() or target.is_symlink():
        try:
            verify_entry(target, digest)
            return target
        except CacheError as err:
            log(WARNING, "Replacing the bad cached model at %s: %s", target, err)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{digest}-"))
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / "config.json").write_text(str(package["config-json"]))
        (tmp / "fedbiot_layout.json").write_text(str(package["layout-json"]))
        for name in names:
            (tmp / name).write_bytes(bytes(package[f"tokenizer:{name}"]))
        others = sorted(p.name for p in tmp.iterdir() if p.name != WEIGHTS)
        (tmp / MANIFEST).write_text(json.dumps({n: _sha256(tmp / n) for n in others}))
        try:
            if target.exists() or target.is_symlink():
                old = tmp.with_name(tmp.name + "-bad")
                os.rename(target, old)
                os.rename(tmp, target)
                _remove(old)
            else:
                os.rename(tmp, target)
        except OSError as err:
            raise CacheError(f"cannot replace the cached model at {target}: {err}") from err
        _VERIFIED[str(target)] = _signature(target)  # hashed above, as it was written
    finally:
        _remove(tmp)
    return target


def load_client_model(
    cache: Path,
    digest: str,
    spec: LoraSpec,
    quantization: str = "none",
    dtype: torch.dtype = torch.float32,
) -> ClientModel:
    """The compressed model of ``digest`` with float32 LoRA on all its blocks; its frozen
    weights in ``dtype``, or in 4 or 8 bits where ``quantization`` asks and the node can
    (see models/quantization)."""
    checked_digest(digest, "config key 'model-digest'")
    key = (digest, spec, quantization, dtype)
    if key in _MEMO:
        return _MEMO[key]
    directory = cache / digest
    if not directory.exists():
        raise MissingBaseError(f"no cached compressed model {digest} in {cache}")
    try:
        verify_entry(directory, digest)
    except CacheError as err:
        raise CacheError(
            f"cached model at {directory} is bad, not loaded: {err}; "
            "the server re-sends the weights after this failed reply and they replace it"
        ) from err
    raw = json.loads((directory / "fedbiot_layout.json").read_text())
    layout = Layout(
        num_blocks=raw["num_blocks"],
        adapter_blocks=tuple(raw["adapter_blocks"]),
        emulator_blocks=tuple(raw["emulator_blocks"]),
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.loading import quiet_progress_off_terminal
    from models.lora import LoraModel
    from models.quantization import load_plan

    quiet_progress_off_terminal()
    plan = load_plan(quantization, dtype)
    model = AutoModelForCausalLM.from_pretrained(directory, **plan.kwargs)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lora = LoraModel(model, layout.kept_blocks, layout.kept_blocks, spec)
    _MEMO.clear()
    _MEMO[key] = ClientModel(
        lora=lora,
        tokenizer=tokenizer,
        layout=layout,
        quantization=plan.mode,
        quantization_note=plan.note,
    )
    return _MEMO[key]
