"""Run untrusted generated code: a separate process, a time limit, no network, a temp dir.

The code runs in a fresh ``python -I`` process (isolated mode: no user site, no environment
variables), in a new temporary working directory that is deleted afterwards, in its own
session so the whole process group can be killed, with CPU-time and memory limits. A
preamble replaces the socket constructor so the code cannot open network connections. An
infinite loop, a crash, ``sys.exit`` or files written never reach the evaluator.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

_PREAMBLE = """
import resource, socket
resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the sandbox")
socket.socket = _no_network
socket.create_connection = _no_network
del resource, socket
"""


@dataclass(frozen=True)
class SandboxResult:
    """Whether the program exited 0 in time, and why not."""

    passed: bool
    reason: str


def run_program(code: str, timeout: float = 10.0, memory_mb: int = 1024) -> SandboxResult:
    """Run ``code`` (a whole program, e.g. solution + tests) and report how it ended."""
    program = _PREAMBLE.format(memory=memory_mb * 2**20) + code
    with tempfile.TemporaryDirectory(prefix="sandbox-") as workdir:
        path = os.path.join(workdir, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        process = subprocess.Popen(
            [sys.executable, "-I", path],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env={"PATH": "/usr/bin:/bin"},
        )
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            return SandboxResult(False, f"timed out after {timeout:g} s")
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    if process.returncode == 0:
        return SandboxResult(True, "passed")
    last = stderr.decode(errors="replace").strip().splitlines()
    return SandboxResult(False, last[-1] if last else f"exit code {process.returncode}")
