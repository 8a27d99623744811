"""The Docker services' commands, checked without Docker: every executable is a Flower command
or a file the image copies, and every flag parses with the installed Flower's own parsers."""

from __future__ import annotations

from pathlib import PurePosixPath

import pytest
from flwr.common.config import parse_config_args
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

from tests.docker_files import (
    REPO,
    SUPERNODES,
    compose_services,
    copy_steps,
    flwr_console_scripts,
    is_bind,
    mounted,
    parse,
    read_entrypoint,
    service_dockerfile,
)


def test_executables_are_flower_commands_or_files_the_image_copies() -> None:
    scripts = flwr_console_scripts()
    for name, service in compose_services().items():
        _, dockerfile = service_dockerfile(name)
        entrypoint = service.get("entrypoint") or read_entrypoint(dockerfile)
        executable = entrypoint[0]
        if executable in scripts:
            continue
        copied = {
            str(PurePosixPath(dest) / PurePosixPath(src).name) if dest.endswith("/") else dest: src
            for sources, dest in copy_steps(dockerfile)
            for src in sources
        }
        by_name = {PurePosixPath(dest).name: src for dest, src in copied.items()}
        source = copied.get(executable) or by_name.get(executable)
        assert source, f"{name}: {executable} is neither a flwr command nor copied into the image"
        assert (REPO / source).is_file(), f"{name}: {executable} comes from missing {source}"


def test_superlink_flags_are_accepted_and_its_files_mounted() -> None:
    superlink = compose_services()["superlink"]
    assert read_entrypoint(service_dockerfile("superlink")[1]) == ["flower-superlink"]
    args = parse(_parse_args_run_superlink(), superlink["command"])
    assert args.host == "0.0.0.0", "the SuperLink must listen beyond the container's loopback"
    assert args.enable_supernode_auth and not args.insecure
    assert not args.runtime_dependency_install, "runs must use the image's packages"
    assert args.isolation == "subprocess"
    for path in (args.ssl_ca_certfile, args.ssl_certfile, args.ssl_keyfile, args.database):
        assert path and mounted(superlink, path), f"superlink: {path} is not mounted"
    published = [p.rsplit(":", 1)[-1] for p in superlink["ports"]]
    assert str(args.port) in published, "the SuperLink port is not published"


@pytest.mark.parametrize("name", SUPERNODES)
def test_supernode_flags_are_accepted_and_its_files_mounted(name: str) -> None:
    services = compose_services()
    node = services[name]
    assert read_entrypoint(service_dockerfile(name)[1]) == ["flower-supernode"]
    args = parse(_parse_args_run_supernode(), node["command"])
    link_port = parse(_parse_args_run_superlink(), services["superlink"]["command"]).port
    assert args.superlink == f"superlink:{link_port}"
    assert not args.insecure and args.root_certificates and args.auth_supernode_private_key
    for path in (args.root_certificates, args.auth_supernode_private_key):
        assert mounted(node, path), f"{name}: {path} is not mounted"
    key_source, _ = mounted(node, args.auth_supernode_private_key) or ("", "")
    assert key_source == f"./keys/{name}", f"{name} must use its own key, not {key_source}"
    config = parse_config_args([args.node_config])
    cache = mounted(node, str(config["cache-dir"]))
    assert cache and not is_bind(cache[0]), f"{name}: cache-dir is not on a named volume"
    if "data-file" in config:
        data = mounted(node, str(config["data-file"]))
        assert data and is_bind(data[0]), f"{name}: data-file is not on its data mount"
    else:
        assert 0 <= int(config["partition-id"]) < int(config["num-partitions"])


def test_register_service_sees_the_keys_and_ca_it_is_told_about() -> None:
    register = compose_services()["register-supernodes"]
    env = register["environment"]
    assert mounted(register, env["ROOT_CERTIFICATES"])
    keys = mounted(register, env["KEYS_DIR"])
    assert keys == ("./keys", env["KEYS_DIR"])
    link_port = parse(_parse_args_run_superlink(), compose_services()["superlink"]["command"]).port
    assert env["SUPERLINK_ADDRESS"] == f"superlink:{link_port}"
    for name in SUPERNODES:
        depends = compose_services()[name]["depends_on"]["register-supernodes"]
        assert depends["condition"] == "service_completed_successfully"
