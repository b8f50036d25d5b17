"""One kernel build at a time per build key, across processes, and no lock that outlives its owner.

The lock is ``<cache>/kernels/<name>-<key>.lock``: an advisory ``flock`` on that file (the kernel drops it when the
owner exits, however it exits, so a killed build cannot leave a lock that blocks every later run, as torch's own
build ``lock`` file did), with the owner's pid and host written in it for the messages. Where ``fcntl`` is missing
the file itself is the lock (created exclusively) and a lock whose pid is no longer running on this host is stale:
it is removed and taken over.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from specdec.errors import KernelBuildError

POLL_S = 0.2

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None


def _owner_text() -> str:
    return f"{os.getpid()} {socket.gethostname()}\n"


def read_owner(path: Path) -> tuple[int | None, str | None]:
    """(pid, host) written in the lock file ``path``; (None, None) when missing or unreadable."""
    try:
        pid, host = path.read_text().split()[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None, None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class BuildLock:
    """``with BuildLock(path, timeout_s, on_wait):`` holds the build lock of one key; ``on_wait(pid)`` is called once
    when another process holds it; waiting more than ``timeout_s`` raises :class:`KernelBuildError`."""

    def __init__(self, path: Path, timeout_s: float, on_wait=None):
        self.path = Path(path)
        self.timeout_s = timeout_s
        self.on_wait = on_wait
        self._fd: int | None = None

    def __enter__(self) -> "BuildLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.timeout_s
        told = False
        while not self._try_acquire():
            pid, host = read_owner(self.path)
            if not told and self.on_wait is not None:
                self.on_wait(pid)
                told = True
            if time.monotonic() > deadline:
                raise KernelBuildError(
                    f"waited {self.timeout_s:.0f} s for the kernel build of process {pid} on {host} (lock "
                    f"{self.path}); if no build is running, delete that file; or set SPECDEC_KERNELS=0 to run the "
                    "portable fallback")
            time.sleep(POLL_S)
        return self

    def __exit__(self, *exc) -> None:
        if fcntl is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
        else:
            os.close(self._fd)
            self.path.unlink(missing_ok=True)
        self._fd = None

    def _try_acquire(self) -> bool:
        if fcntl is not None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            os.ftruncate(fd, 0)
            os.write(fd, _owner_text().encode())
            self._fd = fd
            return True
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            pid, host = read_owner(self.path)
            if pid is not None and host == socket.gethostname() and not pid_alive(pid):
                self.path.unlink(missing_ok=True)  # stale: its owner died; the next try takes it
            return False
        os.write(fd, _owner_text().encode())
        self._fd = fd
        return True
