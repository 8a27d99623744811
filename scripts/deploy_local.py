"""A real deployment on one machine: one SuperLink and N SuperNodes as separate processes.

    python scripts/deploy_local.py start --dir deploy --nodes 3            # TLS + node auth
    FLWR_HOME=deploy/flwr-home flwr run . local --stream --run-config "..."
    python scripts/deploy_local.py stop --dir deploy

``start`` makes a CA and a SuperLink certificate (``scripts/make_certs.sh``), an ECDSA key
pair per SuperNode, starts the SuperLink with TLS and SuperNode authentication, registers
each node's public key with ``flwr supernode register``, and starts every SuperNode with its
own node config (``partition-id``, ``num-partitions``, its own model ``cache-dir``, and any
``--node-config`` extras). It writes a Flower config (``<dir>/flwr-home/config.toml``) whose
``local`` connection trusts the CA, and the process ids to ``<dir>/pids``; ``stop`` ends them.
``--insecure`` skips TLS and authentication.
"""

from __future__ import annotations

import argparse
import contextlib
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


def start(args: argparse.Namespace) -> None:
    root = Path(args.dir).resolve()
    if (root / "pids").exists():
        raise SystemExit(f"{root} already runs a deployment; stop it first")
    home, logs, keys = root / "flwr-home", root / "logs", root / "keys"
    for d in (home, logs, keys):
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
        if args.node_config:
            config += " " + args.node_config
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
        pids.append(_spawn(node, logs / f"supernode{i}.log", env))
        (root / "pids").write_text("\n".join(map(str, pids)))
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
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    pid_file.unlink()
    print(f"stopped the deployment in {root}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("start", "stop"))
    parser.add_argument("--dir", default="deploy", help="state, keys, certificates and logs")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--insecure", action="store_true", help="no TLS, no authentication")
    parser.add_argument("--node-config", default="", help="extra node config for every node")
    parser.add_argument(
        "--unregistered",
        type=int,
        default=0,
        help="start this many of the nodes without registering their keys (they are refused)",
    )
    args = parser.parse_args()
    if args.action == "start":
        start(args)
    else:
        stop(args)


if __name__ == "__main__":
    main()
