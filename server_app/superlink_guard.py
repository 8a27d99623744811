"""The ServerApp stops when its SuperLink is gone, before it writes the run folder again.

Flower runs the ServerApp in a non-daemon thread of ``flwr-simulation`` (``flwr-serverapp``
in a deployment). When the SuperLink dies, that process's own shutdown ends its main thread,
but in simulation the ServerApp thread goes on training its in-process clients and writes
rounds, checkpoints and the export that nobody collects: a second writer in a folder that a
later ``resume-from`` continues. So every write of the run folder first checks that the
SuperLink's runtime API, whose address Flower passes on the process's command line, still
accepts connections (a TCP connect, well under a millisecond on loopback). Flower offers no
liveness call to a ServerApp, hence this check.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Sequence

# The flags Flower 1.41 starts flwr-simulation and flwr-serverapp with (and older aliases).
_FLAGS = ("--runtime-api-address", "--simulationio-api-address", "--serverappio-api-address")
ATTEMPTS = 3  # a SuperLink busy with a burst of connections is not a dead one
RETRY_WAIT_S = 0.5


class SuperLinkGoneError(RuntimeError):
    """The SuperLink that started this ServerApp no longer answers."""


def runtime_address(argv: Sequence[str]) -> tuple[str, int] | None:
    """``(host, port)`` of the SuperLink's runtime API from a Flower app process's command
    line; None for a ServerApp that no SuperLink started (e.g. Flower's Python API)."""
    for i, arg in enumerate(argv):
        name, equals, value = arg.partition("=")
        if name not in _FLAGS:
            continue
        if not equals:
            value = argv[i + 1] if i + 1 < len(argv) else ""
        host, _, port = value.rpartition(":")
        if host and port.isdigit():
            return host.strip("[]"), int(port)
    return None


def check_superlink(argv: Sequence[str] | None = None) -> None:
    """Return if the SuperLink answers (or none started this process); else raise
    :class:`SuperLinkGoneError` naming its address, so nothing more is written."""
    address = runtime_address(sys.argv if argv is None else argv)
    if address is None:
        return
    error: OSError | None = None
    for attempt in range(ATTEMPTS):
        try:
            with socket.create_connection(address, timeout=2):
                return
        except OSError as failure:
            error = failure
        if attempt + 1 < ATTEMPTS:
            time.sleep(RETRY_WAIT_S)
    host, port = address
    raise SuperLinkGoneError(
        f"the SuperLink at {host}:{port} no longer answers ({error}): the ServerApp stops "
        "here without writing its run folder again; finish the run with resume-from"
    )
