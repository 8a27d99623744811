"""A real SuperLink (simulation runtime) on free loopback ports, driven by ``flwr run``.

Each test session gets its own FLWR_HOME and ports, so it neither uses nor disturbs a
SuperLink the developer may have running, and it stops every process it started.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import NamedTuple

from federation.run_config import run_config_arg

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@functools.cache
def app_dir() -> Path:
    """The app as ``flwr run`` should see it: the checkout's files without what git ignores.

    ``flwr run <dir>`` walks every file under ``dir`` (resolving each) before it filters
    them into the FAB; in a checkout that includes every file of .venv and the caches, seconds
    of CPU per run. This copy, made once per process, holds git's tracked and unignored files
    only, so the FAB (and its hash) is the same and the walk is short.
    Outside a git checkout, or without git, it is the repository itself."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO, capture_output=True, check=False,
        )  # fmt: skip
    except OSError:  # no git (a GPU node's copy of the tree)
        return REPO
    if listed.returncode != 0:
        return REPO
    staged = Path(tempfile.mkdtemp(prefix="fedbiot-app-"))
    atexit.register(shutil.rmtree, staged, ignore_errors=True)
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = REPO / name
        if source.is_file() and not source.is_symlink():
            (staged / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, staged / name)
    return staged


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"SuperLink on port {port} did not open")


def tiny_run_config(out: Path, run_name: str, **overrides: object) -> dict[str, object]:
    """A short run on the tiny Llama-style model writing ``out/<run_name>``; keys given as
    ``overrides`` (Python names, ``_`` for ``-``) replace the defaults."""
    config: dict[str, object] = {
        "model": "tiny-llama",
        # The tests' task and method settings, not the default run's (Banking77 ranking).
        "task": "gsm8k",
        "banking77-eval": "generate",
        "drop-rate": 0.5,
        "learning-rate": 3e-4,
        "batch-size": 2,
        "num-partitions": 2,
        "num-server-rounds": 1,
        "local-steps": 2,
        "seq-length": 48,
        "public-examples": 8,
        "eval-examples": 2,
        "eval-every": 1,
        "eval-generation-examples": 2,
        "fidelity-examples": 4,
        "eval-max-new-tokens": 8,
        "open-ended-examples": 0,
        "prealign-steps": 2,
        "distill-steps": 1,
        "output-dir": str(out),
        "run-name": run_name,
        "data-dir": str(REPO / "data"),
        "cache-dir": str(out / f"{run_name}-node-cache"),
        "num-threads": 1,
    }
    config.update({key.replace("_", "-"): value for key, value in overrides.items()})
    return config


class LocalFederation:
    """Handle on a running SuperLink: ``run()`` submits this repo's app with ``flwr run``."""

    def __init__(
        self, home: Path, env: dict[str, str], superlink: subprocess.Popen | None = None
    ) -> None:
        self.home = home
        self.env = env
        self.superlink = superlink  # the flower-superlink process, for tests that kill it
        self.last_output = ""  # the streamed log of the latest run_to_end

    def _command(
        self, run_config: dict[str, object], supernodes: int, federation_config: str = ""
    ) -> list[str]:
        overrides = run_config_arg(run_config)
        return [
            str(BIN / "flwr"),
            "run",
            str(app_dir()),
            "test",
            "--stream",
            "--federation-config",
            f"num-supernodes={supernodes} {federation_config}".strip(),
            "--run-config",
            overrides,
        ]

    def run(
        self,
        run_config: dict[str, object],
        supernodes: int,
        timeout: float = 600,
        federation_config: str = "",
    ) -> subprocess.CompletedProcess:
        """``flwr run``; ``federation_config`` adds keys such as
        ``client-resources-num-gpus=0.3`` to ``num-supernodes``."""
        return subprocess.run(
            self._command(run_config, supernodes, federation_config),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, run_config: dict[str, object], supernodes: int) -> subprocess.Popen:
        """Submit a run without waiting for it (its log goes to ``<home>/flwr-run.log``)."""
        log = open(self.home / "flwr-run.log", "w")  # noqa: SIM115 - the child holds it
        return subprocess.Popen(
            self._command(run_config, supernodes), env=self.env, stdout=log, stderr=log
        )

    def run_to_end(
        self,
        run_config: dict[str, object],
        supernodes: int,
        timeout: float = 600,
        federation_config: str = "",
    ) -> list[dict]:
        """Run, and return the run's metrics rows once every round has one. `flwr run
        --stream` exits 0 even when the ServerApp raised, so the rows are the proof; the
        streamed ServerApp log goes into the failure message."""
        result = self.run(run_config, supernodes, timeout, federation_config)
        self.last_output = result.stdout
        output = result.stdout[-6000:] + result.stderr[-3000:]
        assert result.returncode == 0, output
        run_dir = Path(str(run_config["output-dir"])) / str(run_config["run-name"])
        if "resume-from" in run_config:
            run_dir = Path(str(run_config["resume-from"]))
        metrics = run_dir / "metrics.jsonl"
        assert metrics.is_file(), f"no {metrics}\n{output}"
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        last = int(run_config.get("num-server-rounds", 1))
        assert rows and rows[-1]["round"] == last, f"rows end before round {last}\n{output}"
        return rows


def flower_env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a Flower CLI process of ours: its own ``FLWR_HOME`` (config, apps,
    SuperLink address), no dependency installs or update checks (nothing can be fetched
    here), and this venv's executables first; ``extra`` on top."""
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        **(extra or {}),
    }


@contextmanager
def local_federation(
    home: Path, extra_env: dict[str, str] | None = None
) -> Iterator[LocalFederation]:
    """Start ``flower-superlink --simulation`` and write a Flower config pointing at it;
    ``extra_env`` (e.g. ``RAY_ADDRESS``) goes to the SuperLink and its simulations."""
    # Flower 1.41 serves the runtime, control and fleet APIs on one HTTP port.
    port = free_port()
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        "[superlink]\n"
        'default = "test"\n\n'
        "[superlink.test]\n"
        f'address = "127.0.0.1:{port}"\n'
        "insecure = true\n"
    )
    env = flower_env(home, extra_env)
    log_file = open(home / "superlink.log", "w")  # noqa: SIM115 - closed in finally
    process = subprocess.Popen(
        [
            str(BIN / "flower-superlink"),
            "--insecure",
            "--simulation",
            "--isolation",
            "subprocess",
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_for_port(port, process)
        yield LocalFederation(home, env, process)
    finally:
        _stop_group(process, 20)
        log_file.close()


def _stop_group(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM to the process group ``process`` leads, SIGKILL after ``timeout`` seconds."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with suppress(ProcessLookupError):  # a test may have killed it already
            os.killpg(process.pid, signal.SIGKILL)


# `ray start` prints this once its raylet has registered with the GCS (ray/scripts/scripts.py);
# the GCS port opens earlier, and a driver joining then finds no node to run on.
RAY_READY = "Ray runtime started."


def _wait_for_ready(log: Path, head: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}:\n{log.read_text()}")
        if RAY_READY in log.read_text():
            return
        time.sleep(0.2)
    raise TimeoutError(f"the Ray head did not start in {timeout:.0f} s:\n{log.read_text()}")


class RayHead(NamedTuple):
    address: str  # what simulations join through RAY_ADDRESS
    temp_dir: Path  # the head's session files and logs
    process: subprocess.Popen
    log: Path  # what `scripts/ray_cluster.sh head` printed


@contextmanager
def ray_head(log: Path, num_cpus: int = 2) -> Iterator[RayHead]:
    """A Ray head of its own (``scripts/ray_cluster.sh head``, its output in ``log``) for
    simulations to join; stopped, and its files removed, at the end.

    Ray's socket paths must stay short: its files go to a short folder of their own, which
    also keeps simulations elsewhere on the machine from joining this cluster (``ray.init()``
    without an address joins the latest cluster under /tmp/ray)."""
    ray_dir = Path(tempfile.mkdtemp(prefix="rc-", dir="/tmp"))
    port = free_port()
    env = {**os.environ, "RAY_TEMP_DIR": str(ray_dir)}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)  # a head, not a worker joining someone's cluster
    log_file = open(log, "w")  # noqa: SIM115 - closed in finally
    # Two heads on one machine (one per xdist worker) must not share a port: `ray start`
    # hands its workers and drivers ports from 10002 up, in order, and a driver given a port
    # the other head's worker holds aborts (core worker "Failed to start the grpc server"),
    # which ended a run with nothing written. Random worker ports (0, as ``ray.init()``
    # uses) and free ports for the Ray Client server and the dashboard agent.
    head = subprocess.Popen(
        ["bash", str(REPO / "scripts" / "ray_cluster.sh"), "head", str(port),
         "--num-cpus", str(num_cpus), "--min-worker-port", "0", "--max-worker-port", "0",
         "--ray-client-server-port", str(free_port()),
         "--dashboard-agent-listen-port", str(free_port()), "--block"],
        env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        _wait_for_ready(log, head)
        # The address the head registered under (its node's IP), as `ray start` wrote it.
        address = (ray_dir / "ray_current_cluster").read_text().strip()
        yield RayHead(address, ray_dir, head, log)
    finally:
        _stop_group(head, 60)
        log_file.close()
        shutil.rmtree(ray_dir, ignore_errors=True)
