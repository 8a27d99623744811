"""What the Docker tests read: the compose services, Dockerfile instructions, mounts and
the installed Flower's own argument parsers."""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shlex
import subprocess
import sys
from importlib.metadata import distribution
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
GPU_OVERRIDE = DOCKER / "compose.gpu.yaml"
SUPERNODES = ("supernode-0", "supernode-1", "supernode-2")
FLWR_VERSION = "1.41.0"

# Host paths that the README's steps make, not the repository: top folder -> the README
# line that makes it.
GENERATED = {
    "certs": "scripts/make_certs.sh docker/certs superlink",
    "keys": "for i in 0 1 2; do ssh-keygen -q -t ecdsa -b 384 -N '' "
    "-f docker/keys/supernode-$i; done",
    "node-data": "mkdir -p docker/node-data/supernode-0 docker/node-data/supernode-1 "
    "docker/node-data/supernode-2",
}


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a YAML mapping"
    return data


def compose_services(path: Path = COMPOSE) -> dict[str, dict[str, Any]]:
    services = load(path)["services"]
    assert isinstance(services, dict) and services, f"{path} has no services"
    return services


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` with the defaults, so checks do not depend on the
    caller's environment."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", value)


def build_dockerfile(build: dict[str, Any]) -> tuple[Path, Path]:
    """(build context, Dockerfile) of a compose ``build`` section."""
    context = (DOCKER / interpolate(build["context"])).resolve()
    return context, context / build.get("dockerfile", "Dockerfile")


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    result = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def from_image(dockerfile: Path, from_arguments: str) -> str:
    """The image a ``FROM`` names, with ``${ARG}`` replaced by the default that the
    Dockerfile's ``ARG`` lines above the first ``FROM`` give it."""
    defaults: dict[str, str] = {}
    for keyword, rest in instructions(dockerfile):
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in rest:
            name, _, value = rest.partition("=")
            defaults[name.strip()] = value.strip().strip("\"'")

    def default(match: re.Match[str]) -> str:
        assert match.group(1) in defaults, (
            f"{dockerfile.name}: FROM ${match.group(1)} has no default"
        )
        return defaults[match.group(1)]

    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", default, from_arguments.split()[0])


def copy_steps(dockerfile: Path) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY/ADD from the build context."""
    copies = []
    for keyword, rest in instructions(dockerfile):
        if keyword not in ("COPY", "ADD"):
            continue
        words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        flags = [w for w in words if w.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue
        paths = [w for w in words if not w.startswith("--")]
        copies.append((paths[:-1], paths[-1]))
    return copies


def bind_mount_sources(dockerfile: Path) -> list[str]:
    """Build-context paths that ``RUN --mount=type=bind,source=...`` reads."""
    sources = []
    for keyword, rest in instructions(dockerfile):
        for flag in re.findall(r"--mount=(\S+)", rest) if keyword == "RUN" else []:
            options = dict(o.partition("=")[::2] for o in flag.split(","))
            if options.get("type") == "bind" and "from" not in options:
                sources.append(options.get("source", "."))
    return sources


def read_entrypoint(dockerfile: Path) -> list[str]:
    forms = [
        json.loads(rest) for keyword, rest in instructions(dockerfile) if keyword == "ENTRYPOINT"
    ]
    assert forms, f"{dockerfile} has no ENTRYPOINT"
    return forms[-1]


def ignored(dockerfile: Path, relative: str) -> bool:
    """Whether ``<Dockerfile>.dockerignore`` leaves ``relative`` out of the build context:
    the last pattern that matches the path or one of its parents decides."""
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    if not ignore.exists():
        return False
    parts = PurePosixPath(relative).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in ignore.read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(c, pattern) for c in candidates):
            excluded = not negate
    return excluded


def mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of the short-syntax volumes of a service."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target, *_ = interpolate(volume).split(":")
        mounts.append((source, target))
    return mounts


def is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def mounted(service: dict[str, Any], container_path: str) -> tuple[str, str] | None:
    """The mount that provides ``container_path`` (the file itself or a folder above it)."""
    path = PurePosixPath(container_path)
    for source, target in mounts(service):
        if path == PurePosixPath(target) or PurePosixPath(target) in path.parents:
            return source, target
    return None


def parse(parser: argparse.ArgumentParser, command: list[str]) -> argparse.Namespace:
    """Parse with Flower's own parser (``${VAR:-default}`` words at their default);
    argparse exits on an unknown or malformed flag, and without abbreviations a misspelt
    flag that happens to be a prefix fails too."""
    parser.allow_abbrev = False
    try:
        return parser.parse_args([interpolate(str(word)) for word in command])
    except SystemExit as exc:
        pytest.fail(f"{parser.prog} rejects {command}: exit {exc.code}")


def flwr_console_scripts() -> set[str]:
    return {ep.name for ep in distribution("flwr").entry_points if ep.group == "console_scripts"}


def service_dockerfile(name: str) -> tuple[Path, Path]:
    return build_dockerfile(compose_services()[name]["build"])


def image_requirements(pyproject: Path) -> list[str]:
    """What the Dockerfiles install, from the same script they run."""
    script = DOCKER / "app_requirements.py"
    result = subprocess.run(
        [sys.executable, str(script), str(pyproject)], check=True, capture_output=True, text=True
    )
    return result.stdout.splitlines()


def dockerfiles() -> list[Path]:
    return sorted(p for p in DOCKER.glob("Dockerfile.*") if p.suffix != ".dockerignore")
