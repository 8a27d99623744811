"""The GPU check's parts that run without a GPU: its guard, the random-weight stand-in for
weights that cannot reach a GPU node, and its `flwr run` on a real loopback deployment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.gpu_check import federation_check, keep_logs, random_weights
from models.loading import load_model
from tests.flower_runtime import tiny_run_config


def _gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", *args], capture_output=True, text=True
    )


def test_gpu_check_has_help() -> None:
    done = _gpu_check("--help")
    assert done.returncode == 0 and "tokens/s" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the guard is for machines without CUDA")
def test_gpu_check_refuses_to_run_without_cuda() -> None:
    done = _gpu_check()
    assert done.returncode == 2
    assert "needs a CUDA device" in done.stderr


def test_random_weights_keep_the_shapes_and_tokenizer_and_replace_the_values(
    tmp_path: Path,
) -> None:
    trained, tokenizer = load_model("tiny-gpt2")
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)  # weights no seeded initialisation gives
    trained.save_pretrained(tmp_path / "trained")
    tokenizer.save_pretrained(tmp_path / "trained")
    stand_in, stand_in_tokenizer = load_model(
        random_weights(str(tmp_path / "trained"), tmp_path / "m")
    )
    ours, theirs = trained.state_dict(), stand_in.state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert stand_in_tokenizer.get_vocab() == tokenizer.get_vocab()
    assert all(not torch.equal(ours[k], theirs[k]) for k in ours)
    again, _ = load_model(random_weights(str(tmp_path / "trained"), tmp_path / "again"))
    assert all(torch.equal(v, theirs[k]) for k, v in again.state_dict().items()), "seeded"


@pytest.mark.xdist_group("deployment")
def test_federation_check_runs_fedbiot_on_three_supernode_processes(tmp_path: Path) -> None:
    settings = tiny_run_config(tmp_path, "unused", eval_every=2, fraction_evaluate=0.0)
    keep = ("model", "run-name", "output-dir", "data-dir", "cache-dir", "num-partitions")
    keep += ("num-server-rounds",)
    overrides = {k: v for k, v in settings.items() if k not in keep}
    # One round: the deployment's kill, restart and second round are test_deployment.py's.
    result = federation_check(tmp_path, 1, "tiny-llama", "cpu", 300, overrides)
    assert result["rounds"] == 1 and result["last"]["round"] == 1
    assert result["last"]["clients_sampled"] == 3 and result["last"]["clients_failed"] == 0
    assert (tmp_path / "gpu-check" / "adapfu" / "config.json").is_file()
    assert not (tmp_path / "deploy" / "pids").exists(), "the deployment is stopped"


@pytest.mark.xdist_group("deployment")
def test_a_federation_check_past_its_limit_raises_and_stops_the_deployment(
    tmp_path: Path,
) -> None:
    with pytest.raises(subprocess.TimeoutExpired):
        federation_check(tmp_path, 1, "tiny-llama", "cpu", 1)
    assert not (tmp_path / "deploy" / "pids").exists()
    keep_logs(tmp_path, tmp_path / "out" / "gpu_check")
    kept = {p.name for p in (tmp_path / "out" / "gpu_check-logs").iterdir()}
    assert {"superlink.log", "supernode0.log", "supernode2.log"} <= kept
