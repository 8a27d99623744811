"""Run many federations the way a user starts one (``flwr run`` on a local SuperLink), a few at
a time, resumably: what the sweep, the case study and the claims bench share.

A run counts as done when its ``metrics.jsonl`` holds its last round (``flwr run`` exits 0 even
when the ServerApp failed); done runs are skipped, so an interrupted study resumes where it
stopped. Each job has its own SuperLink (its own ``FLWR_HOME`` and ports), so two runs never
share one, and one torch thread per core it gets: one run's start-up, model shipping and
message waits then overlap the other's compute.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from queue import Queue

from bench.run_files import metrics_rows
from tests.flower_runtime import local_federation


def finished(run_dir: Path, rounds: int) -> bool:
    """A run whose last round's row is written."""
    rows = metrics_rows(run_dir, missing_ok=True)
    return bool(rows) and rows[-1]["round"] == rounds


def threads_per_run(jobs: int) -> int:
    """The torch threads each of ``jobs`` concurrent runs gets: this process's own thread
    count split between them, not the machine's cores, so that a bench called where the
    cores are already shared (pytest-xdist workers: tests/conftest.py sets each worker's
    count) does not put two threads per process on one core and spin in OpenMP."""
    import torch  # only the benches that run federations pay for the import

    return max(1, torch.get_num_threads() // jobs)


def run_dir(config: dict[str, object]) -> Path:
    return Path(str(config["output-dir"])) / str(config["run-name"])


def run_federations(
    configs: list[dict[str, object]],
    out: Path,
    supernodes: int,
    jobs: int,
    timeout: float,
) -> list[str]:
    """Run every config (``run-name`` under ``output-dir``) that has not finished; returns the
    names of runs that failed (their output's tail goes to stderr). Wall seconds per run are
    kept in ``out/wall_seconds.json``."""
    pending = [
        c
        for c in configs
        if not finished(
            Path(str(c["output-dir"])) / str(c["run-name"]), int(c["num-server-rounds"])
        )
    ]
    wall_file = out / "wall_seconds.json"
    wall: dict[str, float] = json.loads(wall_file.read_text()) if wall_file.is_file() else {}
    out.mkdir(parents=True, exist_ok=True)
    wall_file.write_text(json.dumps(wall, indent=2, sort_keys=True))
    failed: list[str] = []
    lock = threading.Lock()
    with ExitStack() as stack:
        federations: Queue = Queue()
        for job in range(min(jobs, len(pending))):
            federations.put(stack.enter_context(local_federation(out / f".flwr-home-{job}")))

        def one_run(config: dict[str, object]) -> None:
            name, folder = str(config["run-name"]), run_dir(config)
            shutil.rmtree(folder, ignore_errors=True)  # an interrupted run starts again
            federation = federations.get()
            try:
                begin = time.perf_counter()
                result = federation.run(config, supernodes=supernodes, timeout=timeout)
                seconds = time.perf_counter() - begin
            finally:
                federations.put(federation)
                # A node keeps the frozen weights per node id, and the ids are new every run:
                # kept, the caches of 24 runs fill about 30 GB.
                if config.get("cache-dir"):
                    shutil.rmtree(str(config["cache-dir"]), ignore_errors=True)
            with lock:
                wall[name] = seconds
                wall_file.write_text(json.dumps(wall, indent=2, sort_keys=True))
                if result.returncode or not finished(folder, int(config["num-server-rounds"])):
                    sys.stderr.write(result.stdout[-4000:] + result.stderr[-4000:])
                    print(f"{name} failed", flush=True)
                    failed.append(name)
                    return
            print(f"{name}: {seconds:.0f} s", flush=True)

        with ThreadPoolExecutor(max(1, jobs)) as pool:
            list(pool.map(one_run, pending))
    return failed
