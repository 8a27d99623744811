"""``scripts/run_checked.py``: the README's run command exits non-zero when the run failed
(plain ``flwr run --stream`` exits 0 after a ServerApp crash), and refuses a bad run config
before submitting it, naming the key."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.flower_runtime import REPO, LocalFederation, app_dir, tiny_run_config

SCRIPT = REPO / "scripts" / "run_checked.py"
_spec = importlib.util.spec_from_file_location("run_checked", SCRIPT)
assert _spec is not None and _spec.loader is not None
run_checked = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_checked)


def _overrides(config: dict[str, object]) -> str:
    return " ".join(f"{k}='{v}'" if isinstance(v, str) else f"{k}={v}" for k, v in config.items())


class Wrapped(NamedTuple):
    """What the README's wrapper did: its exit status, the tails of its two streams (the
    run's log on stdout, the wrapper's own verdict on stderr) and how long it took."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_wrapped(
    federation: LocalFederation, config: dict[str, object], supernodes: int, timeout: float
) -> Wrapped:
    """Runs the README's wrapper around ``flwr run`` on ``config``."""
    command = [
        sys.executable,
        str(SCRIPT),
        str(app_dir()),
        "test",
        "--run-config",
        _overrides(config),
    ]
    command += ["--federation-config", f"num-supernodes={supernodes}"]
    start = time.monotonic()
    result = subprocess.run(
        command, env=federation.env, capture_output=True, text=True, timeout=timeout, check=False
    )
    return Wrapped(
        result.returncode, result.stdout[-4000:], result.stderr[-2000:], time.monotonic() - start
    )


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ("no-such-key=1", "unknown run-config key(s) no-such-key"),
        ("distill-lr=1e400", "distill-lr=inf must be finite"),
        ("run-name='../../x'", "run-name='../../x' must be a plain folder name"),
    ],
)
def test_a_bad_run_config_is_refused_before_submitting(
    overrides: str, named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before ``flwr run`` is started: no SuperLink is needed to see the key."""
    assert run_checked.main([str(REPO), "--run-config", overrides]) == 2
    assert named in capsys.readouterr().err


def test_a_run_that_cannot_get_its_nodes_fails_within_node_wait_timeout(
    federation: LocalFederation, tmp_path: Path
) -> None:
    """The local baseline asks for 3 nodes of a 2-node federation: instead of waiting
    forever, its ServerApp fails after ``node-wait-timeout`` naming the counts and the
    reason. ``flwr run`` itself exits 0 after a failed ServerApp; the wrapper reads the run's
    status from the SuperLink and exits 1."""
    config = tiny_run_config(
        tmp_path, "short", method="local", min_train_nodes=3, node_wait_timeout=3.0
    )
    wrapped = run_wrapped(federation, config, 2, timeout=300)
    output = wrapped.output
    assert wrapped.returncode == 1, output
    assert "expected 3 node(s) (run-config min-train-nodes=3" in output, output
    assert "but 2 connected within node-wait-timeout=3 s" in output, output
    # The verdict is the wrapper's own, on stderr, where scripts look for it.
    assert "ended as finished:failed" in wrapped.stderr, output
    assert wrapped.seconds < 240, output
