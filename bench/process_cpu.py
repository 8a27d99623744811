"""CPU-seconds by kind of process for any command: where a federation's (or the test
suite's) CPU goes.

A Flower federation is many processes (the ServerApp's, Ray's daemons and actors, one
ClientApp process per message on a deployed SuperNode, the SuperLink), most of them started
detached, so ``time`` on the command sees little of it. The command runs in a cgroup v1
``cpuacct`` group of its own, which counts every descendant, detached or not; every
``--interval`` seconds each member's CPU time is read from ``/proc/<pid>/stat`` and the
process named by its command line. A process's CPU after its last sample (at most one
interval) is not attributed to its kind: the table's ``unattributed`` row is the group's
total minus the attributed sum. Needs root (it creates the group).

    python -m bench.process_cpu --out cpu.json -- python -m pytest tests/test_methods_e2e.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup/cpuacct")
# First match wins: (substring of the command line, kind).
KINDS = (
    ("flwr-simulation", "ServerApp (flwr-simulation)"),
    ("flwr-serverapp", "ServerApp (deployed)"),
    ("ClientAppActor", "ClientApp (Ray actor)"),
    ("flwr-clientapp", "ClientApp (deployed, one per message)"),
    ("flower-supernode", "SuperNode"),
    ("flower-superlink", "SuperLink"),
    ("flower-superexec", "SuperExec"),
    ("bin/flwr ", "flwr CLI"),
    ("ray::IDLE", "Ray prestarted workers"),
    ("ray::", "Ray daemons"),
    ("/ray/", "Ray daemons"),
    ("-m pytest", "pytest"),
    ("bin/pytest", "pytest"),
    ("import sys;exec(eval(sys.stdin", "pytest"),  # an xdist worker's command line
)


def kind_of(command: str) -> str:
    """The kind of a process from its command line (``other`` when none matches)."""
    return next((kind for part, kind in KINDS if part in command), "other")


def _cpu_seconds(pid: str) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sample(group: Path, stop: threading.Event, interval: float) -> dict[str, list]:
    """pid -> [command line, CPU-seconds at its last sample] for the group's members."""
    seen: dict[str, list] = {}
    while not stop.is_set():
        for pid in (group / "cgroup.procs").read_text().split():
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                cpu = _cpu_seconds(pid)
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue  # exited between the listing and the read
            entry = seen.setdefault(pid, ["", 0.0])
            entry[0] = command.decode(errors="replace").strip() or entry[0]
            entry[1] = max(entry[1], cpu)
        stop.wait(interval)
    return seen


def summary(samples: dict[str, list], total: float | None) -> dict:
    """CPU-seconds and process counts per kind, largest first."""
    cpu, count = Counter(), Counter()
    for command, seconds in samples.values():
        cpu[kind_of(command)] += seconds
        count[kind_of(command)] += 1
    kinds = [
        {"kind": k, "cpu_seconds": round(v, 1), "processes": count[k]} for k, v in cpu.most_common()
    ]
    attributed = sum(cpu.values())
    return {
        "cpu_seconds_total": None if total is None else round(total, 1),
        "unattributed_cpu_seconds": None if total is None else round(total - attributed, 1),
        "kinds": kinds,
    }


def table(result: dict) -> str:
    lines = ["| kind | CPU-s | processes | CPU-s each |", "| --- | --- | --- | --- |"]
    for row in result["kinds"]:
        each = row["cpu_seconds"] / row["processes"]
        lines.append(f"| {row['kind']} | {row['cpu_seconds']} | {row['processes']} | {each:.1f} |")
    if result["cpu_seconds_total"] is not None:
        lines.append(f"| unattributed | {result['unattributed_cpu_seconds']} | | |")
        lines.append(f"| total (cgroup) | {result['cpu_seconds_total']} | | |")
    return "\n".join(lines)


def run(
    command: list[str], interval: float, drain: float
) -> tuple[int, float, float, dict[str, list]]:
    """Exit status, wall seconds, the group's CPU-seconds and the samples of ``command``;
    processes it left running are counted for ``drain`` more seconds, then let go."""
    group = CGROUP / f"process-cpu-{os.getpid()}"
    group.mkdir()
    try:
        stop = threading.Event()
        out: dict[str, dict[str, list]] = {}
        sampler = threading.Thread(target=lambda: out.update(s=sample(group, stop, interval)))
        start = time.monotonic()

        def join_group() -> None:  # in the child, before exec: all its descendants follow
            (group / "cgroup.procs").write_text(str(os.getpid()))

        child = subprocess.Popen(command, preexec_fn=join_group)
        sampler.start()
        code = child.wait()
        wall = time.monotonic() - start
        deadline = time.monotonic() + drain
        while (group / "cgroup.procs").read_text().split() and time.monotonic() < deadline:
            time.sleep(interval)  # detached processes (Ray's daemons) ending
        stop.set()
        sampler.join()
        total = int((group / "cpuacct.usage").read_text()) / 1e9
        for pid in (group / "cgroup.procs").read_text().split():  # e.g. a local SuperLink
            (CGROUP / "cgroup.procs").write_text(pid)
        return code, wall, total, out["s"]
    finally:
        group.rmdir()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the JSON here too")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between samples")
    parser.add_argument(
        "--drain", type=float, default=60.0, help="seconds to wait for what it left running"
    )
    parser.add_argument("--samples", type=Path, help="summarize a saved samples file instead")
    parser.add_argument("command", nargs="*", help="the command, after --")
    args = parser.parse_args(argv)
    if args.samples:
        result = {
            "samples": str(args.samples),
            **summary(json.loads(args.samples.read_text()), None),
        }
    else:
        if not args.command:
            parser.error("give a command after --, or --samples")
        if not CGROUP.is_dir():
            parser.error(f"no cgroup v1 cpuacct hierarchy at {CGROUP}")
        if not os.access(CGROUP, os.W_OK):
            parser.error(f"{CGROUP} is not writable (needs root and a writable cgroup mount)")
        code, wall, total, samples = run(args.command, args.interval, args.drain)
        result = {
            "command": args.command,
            "exit_status": code,
            "wall_seconds": round(wall, 1),
            **summary(samples, total),
            "samples": samples,
        }
    print(table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return int(result.get("exit_status", 0))


if __name__ == "__main__":
    sys.exit(main())
