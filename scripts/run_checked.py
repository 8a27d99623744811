"""``flwr run --stream`` that exits non-zero when the run failed.

    python scripts/run_checked.py . [SUPERLINK] --federation-config "..." --run-config "..."

``flwr run --stream`` exits 0 whatever the ServerApp did (it reports that the run was
submitted and the log streamed), so a script or ``make run`` could not tell a crash from a
finished federation. This wrapper

1. checks the run config before submitting it (``RunConfig.from_flower`` on the app's
   pyproject defaults plus the ``--run-config`` overrides), so an unknown key or a bad value
   is named here: the SuperLink's own refusal of an unknown key does not reach the user;
2. runs ``flwr run ... --stream``, passing its output through;
3. asks the SuperLink for the run's final status (``flwr ls --run-id N --format json``) and
   exits 0 only for ``finished:completed``; 1 for a failed or stopped run, 2 for a refused
   config, or ``flwr``'s own non-zero exit status.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from flwr.common.config import flatten_dict, parse_config_args

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from federation.run_config import ConfigError, RunConfig  # noqa: E402 - after the path

BIN = Path(sys.executable).parent
STARTED = re.compile(r"Successfully started run (\d+)")


def _option_values(args: list[str], option: str) -> list[str]:
    """Every value of ``option`` in ``args`` (``--opt value`` and ``--opt=value``)."""
    values = []
    for i, arg in enumerate(args):
        if arg == option and i + 1 < len(args):
            values.append(args[i + 1])
        elif arg.startswith(option + "="):
            values.append(arg.split("=", 1)[1])
    return values


def check_run_config(app: Path, args: list[str]) -> None:
    """Raise ``ConfigError`` (naming the key) for the config ``flwr run`` would submit."""
    with open(app / "pyproject.toml", "rb") as f:
        defaults = flatten_dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])
    overrides = parse_config_args(_option_values(args, "--run-config"))
    RunConfig.from_flower({**defaults, **overrides})


def run_status(superlink: list[str], run_id: str, wait: float = 30.0) -> str:
    """The SuperLink's final status of run ``run_id``, e.g. ``finished:completed``
    (waiting up to ``wait`` seconds for the SuperLink to record the end of the run)."""
    command = [str(BIN / "flwr"), "ls", *superlink, "--run-id", run_id, "--format", "json"]
    deadline = time.monotonic() + wait
    while True:
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        try:
            status = str(json.loads(result.stdout)["runs"][0]["status"])
        except (ValueError, KeyError, IndexError):
            return f"unknown ({result.stdout.strip()} {result.stderr.strip()})"
        if status.startswith("finished") or time.monotonic() > deadline:
            return status
        time.sleep(1.0)


def main(args: list[str]) -> int:
    positional = [a for a in args[:2] if not a.startswith("-")]
    app = Path(positional[0] if positional else ".")
    try:
        check_run_config(app, args)
    except (ConfigError, ValueError) as error:
        print(f"run_checked: refused before submitting: {error}", file=sys.stderr)
        return 2
    command = [str(BIN / "flwr"), "run", *args]
    if "--stream" not in args:
        command.append("--stream")
    run_id = None
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as p:
        assert p.stdout is not None
        for line in p.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if run_id is None and (match := STARTED.search(line)):
                run_id = match.group(1)
    if p.returncode != 0:
        return p.returncode
    if run_id is None:
        print("run_checked: flwr run started no run", file=sys.stderr)
        return 1
    status = run_status(positional[1:2], run_id)
    if status != "finished:completed":
        print(f"run_checked: run {run_id} ended as {status}", file=sys.stderr)
        return 1
    print(f"run_checked: run {run_id} {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
