"""The sandbox's first process: builds the program's world, then becomes the program.

``sandbox.py`` runs it as ``python -I -S sandbox_init.py SETTINGS`` (standard library only,
no site packages), inside new network, PID, mount, IPC and UTS namespaces where the kernel
allows, as their root. There it mounts a size-capped tmpfs as the new root file system,
binds the interpreter's directories into it read-only and without set-uid, chroots there,
drops to an unused uid with no new privileges, and starts the interpreter on the harness
under the resource limits. It stays as process 1 of the PID namespace, waiting for the
program: when it exits, the kernel kills every other process in the namespace. Without
namespaces (the fallback) it skips the file system and only drops the uid and starts the
program under the limits.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import shutil
import signal
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC = 1, 2, 4, 32, 4096, 16384
PR_SET_NO_NEW_PRIVS = 38

_libc = ctypes.CDLL(None, use_errno=True)


def _encode(text: str | None) -> bytes | None:
    return None if text is None else text.encode()


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    # Python has no mount(2); libc's is the system call itself.
    if _libc.mount(
        _encode(source), _encode(target), _encode(fstype), ctypes.c_ulong(flags), _encode(data)
    ):
        err = ctypes.get_errno()
        raise OSError(err, f"sandbox: mount {source} on {target}: {os.strerror(err)}")


def _bind_read_only(host: str, root: str) -> None:
    """Make ``host`` visible at the same path under ``root``, read-only."""
    target = root + host
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if os.path.islink(host):  # merged /usr: /bin -> usr/bin
        os.symlink(os.readlink(host), target)
        return
    if os.path.isdir(host):
        os.makedirs(target, exist_ok=True)
    else:
        open(target, "a").close()
    _mount(host, target, None, MS_BIND | MS_REC)
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID
    # /dev/null and friends are device nodes: they need device access.
    _mount(None, target, None, flags if host.startswith("/dev/") else flags | MS_NODEV)


def _build_root(root: str, source: str, binds: list[str], size_mb: int, uid: int | None) -> None:
    """A tmpfs root holding only ``binds`` (read-only), a writable /work and /tmp; chroot."""
    _mount("sandbox", root, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size_mb}m,mode=755")
    for host in binds:
        if os.path.lexists(host):
            _bind_read_only(host, root)
    for name, mode in (("work", 0o700), ("tmp", 0o1777)):
        os.mkdir(f"{root}/{name}")
        os.chmod(f"{root}/{name}", mode)
    for name in os.listdir(source):
        shutil.copy(os.path.join(source, name), f"{root}/work/{name}")
    if uid is not None:
        os.chown(f"{root}/work", uid, uid)
    os.chroot(root)
    os.chdir("/work")


def main(settings: dict) -> None:
    uid = settings["uid"]
    if settings["root"]:
        _build_root(settings["root"], settings["source"], settings["binds"], 64, uid)
    else:
        os.chdir(settings["source"])
        if uid is not None:
            os.chown(".", uid, uid)
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0):
        raise OSError(ctypes.get_errno(), "sandbox: prctl(PR_SET_NO_NEW_PRIVS)")
    # This process stays as the namespace's process 1 and reports a signal that killed the
    # program (unshare itself reports it only as a failed sigprocmask).
    pid = os.fork()
    if pid == 0:
        try:
            for name, (soft, hard) in settings["limits"].items():
                resource.setrlimit(getattr(resource, name), (soft, hard))
            os.execve(settings["argv"][0], settings["argv"], {})
        except BaseException as error:
            os.write(2, f"sandbox: cannot start the program: {error}\n".encode())
        os._exit(127)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        os.write(2, f"\nkilled by {signal.Signals(os.WTERMSIG(status)).name}\n".encode())
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.WEXITSTATUS(status))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
