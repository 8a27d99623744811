"""Run untrusted generated code so that it can neither escape nor fake a pass.

Each program runs through ``sandbox_init.py`` under util-linux ``unshare`` in new network,
PID, mount, IPC and UTS namespaces (``--user --map-root-user`` added when not root):

- no network: the namespace has only a loopback device, down (not even 127.0.0.1 works);
- its file system is a 64 MB tmpfs holding ``/work`` (its cwd) and ``/tmp``, plus read-only
  binds of ``/usr``, ``/lib*``, ``/bin``, ``/sbin``, the interpreter's prefix and
  ``/dev/{null,zero,random,urandom}``: system libraries and programs stay readable; ``/etc``,
  ``/home``, ``/root``, the repository, ``/proc``, ``/sys`` and the host's ``/tmp`` are absent;
- it runs as an unused uid (when the server runs as root) with no new privileges, as process 1
  of its PID namespace: when it ends or is killed, every descendant dies with it;
- limits: wall time, CPU seconds, address space, processes, open files, file size; an empty
  environment; stdout and stderr are drained, but only their last ``output_cap`` bytes kept;
- it passes only if the harness prints a per-run random marker after the program (for
  HumanEval: the ``check()`` call) returned, and the process then exits 0: ``sys.exit(0)``
  or ``os._exit(0)`` in a completion is a failure.

Where ``unshare`` or the mounts are not allowed (containers without the capability), a
warning is logged and programs run in the fallback: a new session killed as a group, the
limits, an unused uid when root, a temporary working directory, but with network access,
the host's file system, and descendants that leave the session surviving. The marker is a
secret only from code that does not search the harness's memory for it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path

from flwr.common.logger import log

_INIT = str(Path(__file__).with_name("sandbox_init.py"))
_NAMESPACES = ("--net", "--pid", "--fork", "--kill-child", "--mount", "--ipc", "--uts")
_BINDS = ("/usr", "/lib", "/lib32", "/lib64", "/bin", "/sbin")
_DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
# The trusted part of every program: it takes the marker from stdin (so it is in neither the
# program's files nor its command line), runs the program, and prints the marker only if the
# program returned.
_HARNESS = """\
import os, sys
marker = sys.stdin.buffer.readline()
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
os.environ.clear()  # Python itself set LC_CTYPE (PEP 538)
out = os.dup(1)
with open("program.py", encoding="utf-8") as f:
    code = compile(f.read(), "program.py", "exec")
exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
sys.stdout.flush()
sys.stderr.flush()
os.write(out, marker)
os._exit(0)
"""


@dataclass(frozen=True)
class SandboxResult:
    """Whether the program ran to its end in time, and why not."""

    passed: bool
    reason: str


def _interpreter_binds() -> list[str]:
    """The interpreter's own directories (a pyenv or uv Python lives outside /usr)."""
    real = os.path.realpath(sys.executable)
    return [*_BINDS, *_DEVICES, sys.base_prefix, os.path.dirname(real)]


def _others_can_run(path: str) -> bool:
    """Whether a user without privileges can reach and execute ``path``."""
    parents = Path(path).parents
    return all(p.stat().st_mode & 0o001 for p in (Path(path), *parents))


def _namespace_prefix() -> list[str]:
    flags = list(_NAMESPACES)
    if os.geteuid() != 0:
        flags = ["--user", "--map-root-user", *flags]
    return [shutil.which("unshare") or "/usr/bin/unshare", *flags, "--"]


@functools.cache
def namespaces_available() -> bool:
    """Whether a trivial program passes inside the namespaces; if not, say so loudly."""
    try:  # a long timeout: a loaded machine must not pass for one without namespaces
        probe = _run("pass\n", 120.0, 10.0, 256, 8, 4096, isolated=True)
    except OSError as error:
        probe = SandboxResult(False, str(error))
    if not probe.passed:
        log(
            WARNING,
            "SANDBOX FALLBACK: generated code runs WITHOUT network, file-system and process "
            "isolation (unshare failed: %s). Run the server as root or allow unprivileged "
            "user namespaces to contain it.",
            probe.reason,
        )
    return probe.passed


def run_program(
    code: str,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    cpu_seconds: float | None = None,
    max_processes: int = 16,
    output_cap: int = 64 * 1024,
    isolated: bool | None = None,
) -> SandboxResult:
    """Run ``code`` (a whole program, e.g. solution + tests) and report how it ended.

    ``isolated``: None uses the namespaces where they work (else the logged fallback),
    False forces the fallback.
    """
    if isolated is None:
        isolated = namespaces_available()
    cpu = timeout if cpu_seconds is None else cpu_seconds
    return _run(code, timeout, cpu, memory_mb, max_processes, output_cap, isolated)


def run_programs(codes: list[str], workers: int = 1, **kwargs) -> list[SandboxResult]:
    """``run_program`` on each of ``codes``, ``workers`` at a time (each is its own process)."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(lambda code: run_program(code, **kwargs), codes))


def _run(
    code: str,
    timeout: float,
    cpu_seconds: float,
    memory_mb: int,
    max_processes: int,
    output_cap: int,
    isolated: bool,
) -> SandboxResult:
    marker = f"sandbox-returned-{secrets.token_hex(16)}\n".encode()
    interpreter = os.path.realpath(sys.executable)
    # A uid no one else runs as, so the process limit counts only this program's processes
    # (in the fallback only if that uid can run the interpreter where it is).
    drop = os.geteuid() == 0 and (isolated or _others_can_run(interpreter))
    uid = 1_000_000 + secrets.randbelow(1_000_000) if drop else None
    cpu = max(1, math.ceil(cpu_seconds))
    limits = {  # (soft, hard); SIGXCPU at the soft CPU limit names the cause
        "RLIMIT_CPU": (cpu, cpu + 1),
        "RLIMIT_AS": (memory_mb * 2**20,) * 2,
        "RLIMIT_NPROC": (max_processes,) * 2,
        "RLIMIT_NOFILE": (64, 64),
        "RLIMIT_FSIZE": (16 * 2**20,) * 2,
        "RLIMIT_CORE": (0, 0),
    }
    with tempfile.TemporaryDirectory(prefix="sandbox-") as tmp:
        source = Path(tmp) / "source"
        source.mkdir()
        (source / "harness.py").write_text(_HARNESS, encoding="utf-8")
        (source / "program.py").write_text(code, encoding="utf-8")
        root = Path(tmp) / "root"
        root.mkdir()
        settings = {
            "root": str(root) if isolated else None,
            "source": str(source),
            "binds": _interpreter_binds(),
            "uid": uid,
            "limits": limits,
            "argv": [interpreter, "-I", "harness.py"],
        }
        command = [sys.executable, "-I", "-S", _INIT, json.dumps(settings)]
        process = subprocess.Popen(
            [*_namespace_prefix(), *command] if isolated else command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env={},
            cwd=tmp,
        )
        with contextlib.suppress(BrokenPipeError):
            process.stdin.write(marker)
            process.stdin.close()
        stdout, stderr, timed_out = _drain(process, timeout, output_cap)
    if timed_out:
        return SandboxResult(False, f"timed out after {timeout:g} s")
    if process.returncode == 0 and marker in stdout:
        return SandboxResult(True, "passed")
    last = stderr.decode(errors="replace").strip().splitlines()
    if last:
        return SandboxResult(False, last[-1])
    if process.returncode < 0:
        return SandboxResult(False, f"killed by {signal.Signals(-process.returncode).name}")
    if process.returncode == 0:
        return SandboxResult(False, "exited 0 before the program returned")
    return SandboxResult(False, f"exit code {process.returncode}")


def _drain(process: subprocess.Popen, timeout: float, cap: int) -> tuple[bytes, bytes, bool]:
    """Read stdout and stderr until both close or time runs out, keeping the last ``cap``
    bytes of each; then kill the process group. Returns (stdout, stderr, timed out)."""
    deadline = time.monotonic() + timeout
    tails = {process.stdout: bytearray(), process.stderr: bytearray()}
    selector = selectors.DefaultSelector()
    for stream in tails:
        selector.register(stream, selectors.EVENT_READ)
    timed_out = False
    while selector.get_map():
        if process.poll() is not None:
            # Outside a PID namespace a descendant may hold the pipes: wait a moment only.
            deadline = min(deadline, time.monotonic() + 1.0)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = process.poll() is None
            break
        for key, _ in selector.select(min(remaining, 0.2)):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                selector.unregister(key.fileobj)
                continue
            tail = tails[key.fileobj]
            tail += chunk
            del tail[:-cap]
    selector.close()
    # Killing unshare kills the namespace's process 1 (--kill-child), and with it the
    # namespace; in the fallback, what is left of the session's process group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    process.stdout.close()
    process.stderr.close()
    return bytes(tails[process.stdout]), bytes(tails[process.stderr]), timed_out
