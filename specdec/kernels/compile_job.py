"""The kernel compile, run as its own process by :mod:`specdec.kernels.build`, so that the whole build (this
process, ninja and every compiler it started) ends with the process that asked for it.

Run as a script (``python compile_job.py SPEC_JSON``), never imported by the library: it needs only the standard
library and ``torch.utils.cpp_extension``. Ninja starts each compiler in a process group of its own, so killing
ours does not reach them (what left torch's killed builds compiling on as orphans); what does is SIGTERM to ninja,
which forwards it to every compiler group, and, for anything left, a SIGKILL to every process descended from this
one (on Linux this process is a child subreaper, so a compiler whose parent died is still found below it).
Three ways the build ends early:

- the parent times out, is interrupted or fails: it sends this process SIGTERM (then SIGKILL to its group);
- the parent dies (SIGKILL, a CI cancel, ``timeout``): a watchdog thread here sees the parent's pid go (this process
  is re-parented) within :data:`WATCH_INTERVAL_S`;
- this process gets SIGTERM, SIGINT or SIGHUP.

torch's own builder, with a build folder only this process uses (a fresh temporary one), so its file lock is never
contended and never left behind in a folder anyone else reads.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

WATCH_INTERVAL_S = 0.5
NINJA_GRACE_S = 3.0  # for ninja to pass SIGTERM on to its compilers before everything left is killed
PR_SET_CHILD_SUBREAPER = 36
_stopping = threading.Lock()


def _descendants() -> list[int]:
    """Live processes below this one (Linux /proc; an empty list elsewhere, where the process group must do)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        state, ppid = text[text.rindex(")") + 2:].split()[:2]
        if state != "Z":
            children.setdefault(int(ppid), []).append(int(stat.parent.name))
    found, todo = [], [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal_all(pids, sig) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _stop_build(*_args) -> None:
    """End the build and this process; nothing the build started outlives it."""
    if not _stopping.acquire(blocking=False):
        return  # already stopping (a signal and the watchdog at once)
    _signal_all(_descendants(), signal.SIGTERM)  # ninja passes it on to its compilers' own process groups
    deadline = time.monotonic() + NINJA_GRACE_S
    while _descendants() and time.monotonic() < deadline:
        time.sleep(0.05)
    _signal_all(_descendants(), signal.SIGKILL)
    os.killpg(os.getpgrp(), signal.SIGKILL)  # this process included


def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            _stop_build()
        time.sleep(WATCH_INTERVAL_S)


def _become_subreaper() -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the process group and ninja's own forwarding remain
        pass


def main(spec: dict) -> None:
    _become_subreaper()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _stop_build)
    threading.Thread(target=_watch_parent, args=(spec["parent"],), daemon=True).start()
    from torch.utils.cpp_extension import load

    load(name=spec["name"], sources=spec["sources"], build_directory=spec["build_directory"], verbose=True,
         extra_include_paths=spec["include_paths"], extra_cflags=spec["cflags"], extra_ldflags=spec["ldflags"])


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
