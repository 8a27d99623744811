"""The code sandbox against hostile programs: each escape reproduced on the old sandbox
(issue 15 §4) is a program here, and each test shows it contained."""

from __future__ import annotations

import os
import socket
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from server_app.evaluation import sandbox
from server_app.evaluation.sandbox import run_program
from tests.test_aggregation import caplog_records

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A TCP listener on the host's loopback; a connection attempt lands in its backlog."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    yield server
    server.close()


def _connections(server: socket.socket) -> int:
    count = 0
    while True:
        try:
            server.accept()[0].close()
        except BlockingIOError:
            return count
        count += 1


def _processes_with(token: str) -> list[int]:
    """Host processes whose command line contains ``token``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and token in (entry / "cmdline").read_text():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.parametrize(
    "connect",
    [
        "import _socket\ns = _socket.socket()\ns.settimeout(2)\ns.connect(('127.0.0.1', {port}))",
        "import importlib, socket\nimportlib.reload(socket)\n"
        "socket.create_connection(('127.0.0.1', {port}), timeout=2)",
        "import subprocess, sys\nsubprocess.run([sys.executable, '-c', "
        "\"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)\"], "
        "check=True)",
    ],
    ids=["_socket", "reload", "subprocess"],
)
def test_no_route_reaches_a_host_listener(listener: socket.socket, connect: str) -> None:
    result = run_program(connect.format(port=listener.getsockname()[1]))
    assert not result.passed
    assert _connections(listener) == 0


@pytest.mark.parametrize(
    "write",
    ["import os\nos.system('echo escaped > {target}')", "open('{target}', 'w').write('escaped')"],
    ids=["os.system", "open"],
)
def test_writes_outside_its_directory_do_not_reach_the_host(tmp_path: Path, write: str) -> None:
    target = tmp_path / "escaped.txt"
    run_program(write.format(target=target))
    assert not target.exists()


def test_the_server_environment_is_unreadable() -> None:
    program = f"""
import os
leaked = []
for pid in ({os.getpid()}, os.getppid(), 1):
    try:
        leaked.append(open(f"/proc/{{pid}}/environ", "rb").read())
    except OSError:
        pass
assert not leaked, "read a process environment"
assert not os.environ, dict(os.environ)
"""
    result = run_program(program)
    assert result.passed, result.reason


def test_the_file_system_view_holds_no_host_data(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("server data")
    hidden = [REPO, secret, "/etc/passwd", "/proc/self", "/sys/kernel", "/root/.bashrc"]
    program = f"import os\nfor path in {[str(p) for p in hidden]!r}:\n"
    program += "    assert not os.path.exists(path), path\nassert os.getcwd() == '/work'\n"
    result = run_program(program)
    assert result.passed, result.reason


@pytest.mark.parametrize("leave", ["", "os.setsid()"], ids=["fork", "setsid"])
def test_a_child_neither_outlives_the_program_nor_blocks_the_evaluator(leave: str) -> None:
    token = f"sandbox-orphan-{os.getpid()}-{len(leave)}"
    program = f"""
import os, sys
if os.fork() == 0:
    {leave or "pass"}
    os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", "{token}"])
"""
    start = time.monotonic()
    result = run_program(program, timeout=60)
    assert time.monotonic() - start < 30  # the child's copy of stderr did not hold us
    assert result.passed, result.reason
    assert _processes_with(token) == []


def test_output_is_read_with_a_cap() -> None:
    program = """
import sys
chunk = "x" * 2**20
for _ in range(300):
    sys.stderr.write(chunk)
for _ in range(50):
    sys.stdout.write(chunk)
raise ValueError("last words")
"""
    tracemalloc.start()
    try:
        result = run_program(program, timeout=300)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.reason == "ValueError: last words"
    assert peak < 8 * 2**20  # 350 MB went through the pipes


def test_the_process_count_is_limited() -> None:
    program = """
import os, time
children = 0
for _ in range(50):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(30)
        os._exit(0)
    children += 1
assert 0 < children < 50, f"{children} forks succeeded"
"""
    result = run_program(program)  # 16 processes by default
    assert result.passed, result.reason


def test_cpu_time_is_limited() -> None:
    start = time.monotonic()
    result = run_program("while True:\n    pass\n", timeout=300, cpu_seconds=1)
    assert result.reason == "killed by SIGXCPU"
    assert time.monotonic() - start < 150


@pytest.mark.parametrize(
    "leave", ["import sys\nsys.exit(0)", "import os\nos._exit(0)", "raise SystemExit"]
)
def test_exiting_0_before_the_end_is_no_pass(leave: str) -> None:
    result = run_program(f"{leave}\nassert False\n")
    assert not result.passed and result.reason == "exited 0 before the program returned"


def test_an_infinite_loop_is_killed() -> None:
    start = time.monotonic()
    result = run_program("while True:\n    pass\n", timeout=2)
    assert not result.passed and result.reason == "timed out after 2 s"
    assert time.monotonic() - start < 10


def test_errors_exit_codes_and_own_files() -> None:
    raised = run_program("raise ValueError('boom')\n")
    assert not raised.passed and raised.reason == "ValueError: boom"
    exited = run_program("import sys\nsys.exit(3)\n")
    assert not exited.passed and exited.reason == "exit code 3"
    before = set(os.listdir("."))
    wrote = run_program(
        "import os\nopen('junk.txt', 'w').write('x')\nassert os.path.exists('junk.txt')\n"
    )
    assert wrote.passed, wrote.reason
    assert set(os.listdir(".")) == before  # it wrote in its own temporary directory
    assert run_program("assert 1 + 1 == 2\n").passed


def test_without_namespaces_the_fallback_is_loud_and_still_decides(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # unshare refusing an option stands for a kernel or container that refuses namespaces.
    monkeypatch.setattr(sandbox, "_NAMESPACES", ("--no-such-namespace",))
    sandbox.namespaces_available.cache_clear()
    try:
        with caplog_records() as records:  # Flower's logger: `flwr run --stream` shows it
            assert not sandbox.namespaces_available()
        assert any("SANDBOX FALLBACK" in r for r in records)
        assert run_program("assert 1 + 1 == 2\n").passed
        assert not run_program("import os\nos._exit(0)\n").passed
        assert not run_program("assert 1 + 1 == 3\n").passed
    finally:
        sandbox.namespaces_available.cache_clear()
