"""Shared test setup: converted models and tokenizers are cached inside the repository."""

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

os.environ.setdefault(
    "FEDBIOT_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "fedbiot")
)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from models.loading import tokenizer_dir
from tests.flower_runtime import LocalFederation, local_federation


@pytest.fixture(scope="session")
def smollm_tokenizer() -> PreTrainedTokenizerBase:
    """The real SmolLM2 tokenizer (with its chat template), from the embedded GGUF."""
    return AutoTokenizer.from_pretrained(tokenizer_dir())


@pytest.fixture(scope="session")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    """One real SuperLink (simulation runtime) for every end-to-end test of the session."""
    with local_federation(tmp_path_factory.mktemp("flwr-home")) as fed:
        yield fed
