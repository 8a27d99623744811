"""Print the app's dependencies from pyproject.toml, one per line, for ``pip install -r``.

The images install the dependencies only, not the app: every run ships the app's code as a
FAB, which Flower puts first on ``sys.path``, so an installed copy would only go stale.
``flwr`` loses its ``simulation`` extra (Ray), which a deployment never uses. Runs on the
image's bare Python, before anything is installed: the standard library only.

    python docker/app_requirements.py pyproject.toml > requirements.txt
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

_REQUIREMENT = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[([^\]]*)\])?(.*)", re.DOTALL)


def deployment_requirement(requirement: str) -> str:
    """``requirement`` without flwr's ``simulation`` extra; anything else unchanged."""
    match = _REQUIREMENT.fullmatch(requirement)
    if match is None or match.group(1).lower() != "flwr" or match.group(2) is None:
        return requirement
    name, extras, rest = match.groups()
    kept = [e.strip() for e in extras.split(",") if e.strip() and e.strip() != "simulation"]
    return f"{name}[{','.join(kept)}]{rest}" if kept else f"{name}{rest}"


def requirements(pyproject: Path) -> list[str]:
    """The ``[project] dependencies``, as a deployment installs them."""
    with pyproject.open("rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    return [deployment_requirement(d) for d in dependencies]


if __name__ == "__main__":
    print("\n".join(requirements(Path(sys.argv[1]))))
