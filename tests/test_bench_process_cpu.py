"""bench.process_cpu on real processes: a detached child's CPU is counted under the kind its
command line names, the group total covers every process, and the exit status passes on."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from bench.process_cpu import CGROUP, kind_of, main

# A parent that starts a detached child (its own session, as Ray's daemons are) burning about
# a second of CPU, waits for it and exits 3. The child's command line names a SuperLink (the
# name is joined at run time, so that the parent's own command line does not hold it).
BURN = "import time\nend = time.process_time() + 1.0\nwhile time.process_time() < end: pass\n"
PARENT = f"""
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", {BURN!r}, "flower-" + "superlink"],
                         start_new_session=True)
child.wait()
sys.exit(3)
"""


@pytest.mark.skipif(
    not CGROUP.is_dir() or os.geteuid() != 0, reason="needs root and a cgroup v1 cpuacct"
)
def test_a_detached_childs_cpu_is_counted_under_its_kind(tmp_path: Path) -> None:
    out = tmp_path / "cpu.json"
    assert main(["--out", str(out), "--drain", "5", "--", sys.executable, "-c", PARENT]) == 3
    result = json.loads(out.read_text())
    kinds = {row["kind"]: row for row in result["kinds"]}
    assert kinds["SuperLink"]["processes"] == 1
    assert kinds["SuperLink"]["cpu_seconds"] >= 0.9  # the second it burned, sampled
    attributed = sum(row["cpu_seconds"] for row in result["kinds"])
    assert result["cpu_seconds_total"] >= attributed
    assert result["unattributed_cpu_seconds"] == pytest.approx(
        result["cpu_seconds_total"] - attributed, abs=0.2
    )
    assert result["exit_status"] == 3 and len(result["samples"]) == 2
    assert not list(CGROUP.glob("process-cpu-*"))  # its group is gone


@pytest.mark.skipif(
    not CGROUP.is_dir() or os.geteuid() != 0 or not shutil.which("setpriv"),
    reason="needs root (to drop it with setpriv) and a cgroup v1 cpuacct",
)
def test_without_root_it_says_so_before_starting_the_command() -> None:
    as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    with tempfile.TemporaryDirectory(dir="/tmp") as shared:  # pytest's tmp is root's alone
        Path(shared).chmod(0o777)
        reachable = Path(shared) / "reachable"
        subprocess.run([*as_nobody, "touch", str(reachable)], check=True)
        assert reachable.exists()  # so the command below could have run
        marker = Path(shared) / "ran"
        result = subprocess.run(
            [*as_nobody, sys.executable, "-m", "bench.process_cpu", "--", "touch", str(marker)],
            capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
            check=False,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert f"{CGROUP} is not writable (needs root" in result.stderr
        assert not marker.exists()


def test_kinds_are_named_from_flowers_and_rays_command_lines() -> None:
    assert kind_of("/v/bin/python3 /v/bin/flwr-simulation --runtime-api-address x") == (
        "ServerApp (flwr-simulation)"
    )
    assert kind_of("ray::ClientAppActor") == "ClientApp (Ray actor)"
    assert kind_of("ray::IDLE") == "Ray prestarted workers"
    assert kind_of("/v/lib/python3.11/site-packages/ray/core/src/ray/raylet/raylet --x") == (
        "Ray daemons"
    )
    assert kind_of("/v/bin/python3 /v/bin/flwr run /tmp/app test --stream") == "flwr CLI"
    assert kind_of("/v/bin/python3 /v/bin/flwr-clientapp --token t") == (
        "ClientApp (deployed, one per message)"
    )
    assert kind_of("bash -c true") == "other"
