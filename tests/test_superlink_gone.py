"""A ServerApp whose SuperLink dies mid-run stops writing its run folder (Flower keeps the
simulation's ServerApp thread running on its own), and the run is finished by resuming it
from its last checkpoint on another SuperLink."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from server_app.superlink_guard import SuperLinkGoneError, check_superlink, runtime_address
from tests.flower_runtime import RayHead, free_port, local_federation, tiny_run_config

pytestmark = pytest.mark.xdist_group("superlink_gone")


def test_runtime_address_is_read_from_flowers_command_lines() -> None:
    simulation = ["flwr-simulation", "--runtime-api-address", "127.0.0.1:39091", "--token", "t"]
    assert runtime_address(simulation) == ("127.0.0.1", 39091)
    assert runtime_address(["flwr-serverapp", "--runtime-api-address=[::1]:9091"]) == (
        "::1",
        9091,
    )
    assert runtime_address(["x", "--simulationio-api-address", "link:9096"]) == ("link", 9096)
    assert runtime_address(["python", "-m", "pytest", "--runtime-api-address"]) is None
    assert runtime_address(["python", "app.py"]) is None


def test_check_passes_while_the_superlink_listens_and_names_it_once_gone() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        check_superlink(["flwr-simulation", "--runtime-api-address", f"127.0.0.1:{port}"])
    closed = free_port()
    with pytest.raises(SuperLinkGoneError, match=f"SuperLink at 127.0.0.1:{closed} no longer"):
        check_superlink(["flwr-simulation", "--runtime-api-address", f"127.0.0.1:{closed}"])
    check_superlink(["python", "app.py"])  # no SuperLink started this process: nothing to check


def _children(pid: int) -> set[int]:
    """Every live descendant of ``pid``, from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _simulations(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"flwr-simulation" in command and state != "Z":
            alive.add(pid)
    return alive


def _rounds(metrics: Path) -> list[int]:
    if not metrics.is_file():
        return []
    return [json.loads(line)["round"] for line in metrics.read_text().splitlines() if line]


def _wait_for_round(run_dir: Path, at_least: int, log: Path) -> None:
    deadline = time.monotonic() + 300
    while not any(r >= at_least for r in _rounds(run_dir / "metrics.jsonl")):
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


def _wait_until_gone(simulations: set[int], run_dir: Path) -> None:
    deadline = time.monotonic() + 120
    while _simulations(simulations):
        assert time.monotonic() < deadline, f"still running: {_rounds(run_dir / 'metrics.jsonl')}"
        time.sleep(0.5)


def _checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("round-*.pt"))


def test_a_server_cut_off_or_killed_mid_run_stops_and_is_resumed(
    tmp_path: Path, session_ray: RayHead
) -> None:
    """The SuperLink dies: its ServerApp stops before its next write. Resumed on another
    SuperLink, the ServerApp process is killed mid-round: resumed again, the run ends with
    every round once. Checkpoints every second round, so each resume drops logged rounds.
    The runs join the session's Ray head: a killed ServerApp is a driver Ray sees go, and
    its actors go with it."""
    ray = {"RAY_ADDRESS": session_ray.address}
    rounds, every = 4, 2  # killed after round 2, then after round 3: 4 rounds cover both
    config = tiny_run_config(tmp_path, "cut", num_server_rounds=rounds, local_steps=20,
                             eval_tasks="", checkpoint_every=every)  # fmt: skip
    run_dir = tmp_path / "cut"
    with local_federation(tmp_path / "home-a", ray) as federation:
        submitted = federation.start(config, supernodes=2)
        _wait_for_round(run_dir, every, tmp_path / "home-a" / "flwr-run.log")
        superlink = federation.superlink
        assert superlink is not None
        simulations = _simulations(_children(superlink.pid))
        assert simulations, "no flwr-simulation process under the SuperLink"
        superlink.kill()  # the SuperLink alone: its ServerApp process lives on
        superlink.wait()
        submitted.wait(timeout=60)
        _wait_until_gone(simulations, run_dir)
    written = _rounds(run_dir / "metrics.jsonl")
    assert written[-1] < rounds, "the ServerApp finished the run without its SuperLink"
    assert not (run_dir / "adapfu").exists()
    first = _checkpoints(run_dir)
    assert first and all(r % every == 0 for r in first) and first[-1] <= written[-1]

    resumed = {**config, "resume-from": str(run_dir)}
    with local_federation(tmp_path / "home-b", ray) as federation:
        submitted = federation.start(resumed, supernodes=2)
        _wait_for_round(run_dir, first[-1] + 1, tmp_path / "home-b" / "flwr-run.log")
        assert federation.superlink is not None
        simulations = _simulations(_children(federation.superlink.pid))
        for pid in simulations:
            os.kill(pid, signal.SIGKILL)  # the ServerApp dies mid-round, no clean stop
        _wait_until_gone(simulations, run_dir)
        # `flwr run --stream` would wait for the SuperLink to time the dead ServerApp out
        # (Flower's heartbeat patience, about a minute): the run is over, stop following it.
        submitted.terminate()
        submitted.wait(timeout=60)
        second = _checkpoints(run_dir)[-1]
        assert not (run_dir / "adapfu").exists()
        rows = federation.run_to_end(resumed, supernodes=2)
    # The series continues from the last checkpoint each time: every round once, in order.
    assert [r["round"] for r in rows] == list(range(rounds + 1))
    assert (run_dir / "adapfu").is_dir()
    for at in (first[-1], second):
        assert (run_dir / f"config-resumed-{at}.json").is_file()
