"""A real deployment on one machine: one SuperLink and N SuperNodes as separate processes.

    python scripts/deploy_local.py start --dir deploy --nodes 3            # TLS + node auth
    FLWR_HOME=deploy/flwr-home flwr run . local --stream --run-config "..."
    python scripts/deploy_local.py stop --dir deploy

Each SuperNode gets its own node config (``partition-id``, ``num-partitions``, its own model
``cache-dir``), plus ``--node-config`` extras for every node and ``--node I:'key=value ...'``
extras for node I alone (e.g. ``--node "0:data-file='/data/mine.jsonl'"``).
``kill-node --node I`` kills SuperNode I and its ClientApp (a crash mid-round);
``start-node --node I`` starts it again with the same key, so it rejoins as the same node.

``start`` makes a CA and a SuperLink certificate (``scripts/make_certs.sh``), an ECDSA key
pair per SuperNode, starts the SuperLink with TLS and SuperNode authentication, registers
each node's public key with ``flwr supernode register``, and starts every SuperNode with its
own node config. It writes a Flower config (``<dir>/flwr-home/config.toml``) whose
``local`` connection trusts the CA, and the process ids to ``<dir>/pids``; ``stop`` ends them.
``--insecure`` skips TLS and authentication.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(home: Path) -> dict[str, str]:
    """tests.flower_runtime.flower_env's settings: this script runs as a file on a node with
    nothing of ours importable, so it keeps its own four lines."""
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def _spawn(command: list[str], log: Path, env: dict[str, str]) -> int:
    with open(log, "w") as f:
        process = subprocess.Popen(
            command, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    return process.pid


def _wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on port {port}")


def _node_extras(entries: list[str], nodes: int) -> dict[int, str]:
    """``I:config`` entries of ``--node`` as {I: config}."""
    extras: dict[int, str] = {}
    for entry in entries:
        index, sep, config = entry.partition(":")
        if not sep or not index.isdigit() or not 0 <= int(index) < nodes:
            raise SystemExit(f"--node {entry!r}: expected I:'key=value ...' with 0 <= I < {nodes}")
        extras[int(index)] = f"{extras.get(int(index), '')} {config}".strip()
    return extras


def _spawn_node(root: Path, index: int) -> int:
    """Start SuperNode ``index`` from its saved command; record its pid."""
    saved = json.loads((root / "nodes" / f"{index}.json").read_text())
    pid = _spawn(saved["command"], Path(saved["log"]), _env(root / "flwr-home"))
    (root / "nodes" / f"{index}.pid").write_text(str(pid))
    with open(root / "pids", "a") as f:
        f.write(f"\n{pid}")
    return pid


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def start(args: argparse.Namespace) -> None:
    root = Path(args.dir).resolve()
    if (root / "pids").exists():
        raise SystemExit(f"{root} already runs a deployment; stop it first")
    home, logs, keys = root / "flwr-home", root / "logs", root / "keys"
    extras = _node_extras(args.node, args.nodes)
    for d in (home, logs, keys, root / "nodes"):
        d.mkdir(parents=True, exist_ok=True)
    env = _env(home)
    port = free_port()
    link = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(port)]
    link += ["--database", str(root / "state.db"), "--disable-runtime-dependency-installation"]
    connection = f'[superlink.local]\naddress = "127.0.0.1:{port}"\n'
    tls: list[str] = ["--insecure"]
    if args.insecure:
        link.append("--insecure")
        connection += "insecure = true\n"
    else:
        certs = root / "certs"
        subprocess.run(["bash", str(HERE / "make_certs.sh"), str(certs)], check=True)
        link += ["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile"]
        link += [str(certs / "server.pem"), "--ssl-keyfile", str(certs / "server.key")]
        link.append("--enable-supernode-auth")
        connection += f'root-certificates = "{certs / "ca.crt"}"\n'
        tls = ["--root-certificates", str(certs / "ca.crt")]
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local"\n\n{connection}')
    pids = [_spawn(link, logs / "superlink.log", env)]
    (root / "pids").write_text("\n".join(map(str, pids)))
    _wait_for_port(port)
    for i in range(args.nodes):
        node = [str(BIN / "flower-supernode"), *tls, "--superlink", f"127.0.0.1:{port}"]
        node += ["--port", str(free_port())]
        partitions = args.nodes - args.unregistered
        config = f"partition-id={i} num-partitions={partitions} cache-dir='{root / 'cache'}'"
        config = " ".join(c for c in (config, args.node_config, extras.get(i, "")) if c)
        node += ["--node-config", config]
        if not args.insecure:
            key = keys / f"node{i}"
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(key)],
                check=True,
            )
            if i < args.nodes - args.unregistered:
                subprocess.run(
                    [str(BIN / "flwr"), "supernode", "register", f"{key}.pub", "local"],
                    check=True,
                    env=env,
                    capture_output=True,
                )
            node += ["--auth-supernode-private-key", str(key)]
        saved = {"command": node, "log": str(logs / f"supernode{i}.log")}
        (root / "nodes" / f"{i}.json").write_text(json.dumps(saved))
        _spawn_node(root, i)
    print(f"SuperLink on 127.0.0.1:{port} and {args.nodes} SuperNodes; logs in {logs}")
    print(f"run: FLWR_HOME={home} flwr run . local --stream")


def stop(args: argparse.Namespace) -> None:
    root = Path(args.dir).resolve()
    pid_file = root / "pids"
    if not pid_file.exists():
        print(f"no deployment in {root}")
        return
    for pid in map(int, pid_file.read_text().split()):
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    time.sleep(2)
    for pid in map(int, pid_file.read_text().split()):
        _kill_group(pid)
    pid_file.unlink()
    print(f"stopped the deployment in {root}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("start", "stop", "kill-node", "start-node"))
    parser.add_argument("--dir", default="deploy", help="state, keys, certificates and logs")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--insecure", action="store_true", help="no TLS, no authentication")
    parser.add_argument("--node-config", default="", help="extra node config for every node")
    parser.add_argument(
        "--node",
        action="append",
        default=[],
        help="I:'key=value ...' extra node config for node I (start); the node (kill/start-node)",
    )
    parser.add_argument(
        "--unregistered",
        type=int,
        default=0,
        help="start this many of the nodes without registering their keys (they are refused)",
    )
    args = parser.parse_args()
    root = Path(args.dir).resolve()
    if args.action == "start":
        start(args)
    elif args.action == "stop":
        stop(args)
    elif len(args.node) != 1 or not (root / "nodes" / f"{args.node[0]}.json").is_file():
        raise SystemExit(f"{args.action} needs --node I naming a node of the deployment in {root}")
    elif args.action == "kill-node":
        _kill_group(int((root / "nodes" / f"{args.node[0]}.pid").read_text()))
    else:
        print(f"SuperNode {args.node[0]} started again, pid {_spawn_node(root, int(args.node[0]))}")


if __name__ == "__main__":
    main()
