"""Shared test setup: converted models and tokenizers are cached inside the repository.

torch and transformers are imported where they are used: pytest-xdist's controller process
loads this file too, and runs no test that needs them."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

os.environ.setdefault(
    "FEDBIOT_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "fedbiot")
)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tests.flower_runtime import LocalFederation, RayHead, local_federation, ray_head

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def pytest_configure(config: pytest.Config) -> None:
    """Each xdist worker's in-process torch gets its share of the cores: torch's default, a
    thread per core in every worker, runs several times as many threads as cores on the
    2-core CI machine, and the workers' threads then wait on each other."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope="session")
def smollm_tokenizer() -> PreTrainedTokenizerBase:
    """The real SmolLM2 tokenizer (with its chat template), from the embedded GGUF."""
    from transformers import AutoTokenizer

    from models.loading import tokenizer_dir

    return AutoTokenizer.from_pretrained(tokenizer_dir())


@pytest.fixture(scope="session")
def session_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    """One Ray head per test process, joined by the simulations of its tests one run at a
    time. A simulation without ``RAY_ADDRESS`` starts and stops a Ray instance of its own
    (GCS, raylet, dashboard and runtime-env agents, monitors, prestarted workers): about
    211 of the 2,014 CPU-seconds the suite's processes used, over some 35 instances
    (docs/ci/2026-12-05-suite-cpu.md). Concurrent runs must not share it: each run's actor
    pool takes every CPU of the cluster, and a second run's actors wait for the first to
    end."""
    with ray_head(tmp_path_factory.mktemp("ray-head") / "ray-head.log") as head:
        yield head


@pytest.fixture
def shared_ray(session_ray: RayHead, monkeypatch: pytest.MonkeyPatch) -> str:
    """For tests whose simulations start from the environment (benches, scripts): their
    SuperLinks inherit ``RAY_ADDRESS``."""
    monkeypatch.setenv("RAY_ADDRESS", session_ray.address)
    return session_ray.address


@pytest.fixture(scope="session")
def federation(
    tmp_path_factory: pytest.TempPathFactory, session_ray: RayHead
) -> Iterator[LocalFederation]:
    """One real SuperLink (simulation runtime) for every end-to-end test of the session, its
    simulations on the session's Ray head."""
    home = tmp_path_factory.mktemp("flwr-home")
    with local_federation(home, {"RAY_ADDRESS": session_ray.address}) as fed:
        yield fed


# Files whose tests take a minute or more each, longest first (`--durations` of a CI run).
# xdist hands tests out in collection order; alphabetically some of these came last, and
# one worker then ran them alone while the other idled. Run first, they overlap.
SLOW_FILES = (
    "test_deployment.py",
    "test_gpu_check.py",
    "test_resume.py",
    "test_superlink_gone.py",
    "test_bench_claims.py",
    "test_bench_sweep.py",
    "test_shared_cache_e2e.py",
    "test_exchange_methods_e2e.py",
    "test_dpo_e2e.py",
    "test_simulation.py",
    "test_run_checked.py",
    "test_fedbialign_e2e.py",
    "test_sampling.py",
    "test_outputs.py",
    "test_bench_client_cost.py",
    "test_bench_round_cost.py",
    "test_bench_scale.py",
    "test_bench_case_study.py",
    "test_ray_cluster.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow files first, in the order above; the rest keep their order (a stable sort)."""
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))
