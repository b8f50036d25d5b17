"""The kernel build survives being killed (specdec.kernels.build): a SIGKILLed first build leaves no compiler running
and no lock that blocks the next run, which builds within a bounded time; a stuck build or wait stops with a message;
SPECDEC_KERNELS takes the usual spellings and refuses others.

Every build here goes to a temporary XDG_CACHE_HOME, never to the user's ~/.cache/specdec/kernels."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from specdec.errors import InvalidInputError, KernelBuildError
from specdec.kernels import build
from specdec.kernels.build_lock import BuildLock

REBUILD_LIMIT_S = build.BUILD_TIMEOUT_S + 120  # a full build takes ~30-60 s on 2 idle cores, minutes on a loaded
#                                              machine; the build stops itself at BUILD_TIMEOUT_S: never forever
NAME = "specdec_cpu_kernels"


def _processes_of(cache: Path) -> list[str]:
    """'pid comm' of every live process of a build into ``cache``: working in a folder under it (ninja and every
    compiler run in the build folder) or naming it on its command line (the compile job). Linux /proc."""
    out = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            stat = (proc / "stat").read_text()
            cwd = os.readlink(proc / "cwd")
            cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] == "Z":
            continue
        if cwd.startswith(str(cache)) or str(cache) in cmdline:
            out.append(f"{proc.name} {stat[stat.index('(') + 1: stat.rindex(')')]}")
    return out


COMPILERS = ("cc1plus", "c++", "g++", "gcc", "cc", "as", "ld")


def _build_process(cache: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "SPECDEC_KERNELS": "1"}
    code = "from specdec.kernels.build import cpu_kernels, kernel_status; cpu_kernels(); print(kernel_status()['cpu'])"
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the build's processes through Linux /proc")
@pytest.mark.skipif(build._unavailable("auto", "auto") is not None, reason="this CPU cannot run the kernels")
def test_a_killed_first_build_leaves_nothing_running_and_the_next_run_builds(tmp_path_factory):
    cache = tmp_path_factory.mktemp("kill-build")
    # Ctrl-C (the parent stops the build itself), then SIGKILL (as a CI cancel or `timeout -s KILL` would: the build
    # notices its parent is gone)
    for sig in (signal.SIGINT, signal.SIGKILL):
        _kill_while_compiling(cache, sig)
    kernels = cache / "specdec" / "kernels"
    folder = kernels / f"{NAME}-{build.build_key()}"
    assert not folder.exists(), "a half-built folder was renamed into place"
    assert list(kernels.glob(f".building-{folder.name}-*")), "the killed build's temporary folder should be left"
    folder.mkdir()  # and what torch's builder used to leave behind when killed in place: its lock, no extension
    (folder / "lock").write_text("")

    t0 = time.monotonic()
    second = _build_process(cache)
    try:
        out, _ = second.communicate(timeout=REBUILD_LIMIT_S)
    finally:
        second.kill()
    assert second.returncode == 0 and out.strip().endswith("native"), out
    assert any(folder.glob(f"{NAME}*.so")) and not (folder / "lock").exists()
    assert not list(kernels.glob(f".building-{folder.name}-*")), "the leftover temporary folder was not cleaned"
    print(f"rebuilt after the kill in {time.monotonic() - t0:.0f} s")
    _share_with_this_session(folder)


def _kill_while_compiling(cache: Path, sig: int) -> None:
    build_run = _build_process(cache)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:  # wait until the compilers run
        if any(m.split()[1] in COMPILERS for m in _processes_of(cache)):
            break
        assert build_run.poll() is None, build_run.stdout.read()
        time.sleep(0.2)
    else:
        build_run.kill()
        pytest.fail("the build never started its compilers")
    running = _processes_of(cache)
    build_run.send_signal(sig)
    build_run.wait(timeout=60)
    gone = time.monotonic() + 20
    while _processes_of(cache) and time.monotonic() < gone:
        time.sleep(0.2)
    left = _processes_of(cache)
    for entry in left:  # a failing test must not leave compilers running on a shared machine
        try:
            os.kill(int(entry.split()[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, \
        f"after {signal.Signals(sig).name}, the build's processes outlived it: {left} (were {running})"


def _share_with_this_session(folder: Path) -> None:
    """Hand the finished build to this test session's cache (tests/conftest.py), so later tests load, not rebuild."""
    mine = build._cache_root() / folder.name
    if not mine.exists():
        mine.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(folder, mine)


def test_a_stuck_build_is_stopped_with_a_message_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(build, "BUILD_TIMEOUT_S", 2.0)
    with pytest.raises(KernelBuildError, match="took more than 2 s and was stopped"):
        build._build("specdec_timeout_probe", build.SOURCES)
    kernels = tmp_path / "specdec" / "kernels"
    assert not list(kernels.glob(".building-*")) and not list(kernels.glob("specdec_timeout_probe-*/"))
    assert not _processes_of(tmp_path), "the stopped build left processes running"


_HOLDER = """
import sys, time
from pathlib import Path
from specdec.kernels.build_lock import BuildLock
with BuildLock(Path(sys.argv[1]), 5):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_lock_of_a_live_build_is_waited_for_and_one_of_a_dead_one_is_taken(tmp_path):
    path = tmp_path / "k.lock"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        waited = []
        with pytest.raises(KernelBuildError, match=rf"waited 1 s for the kernel build of process {holder.pid}"):
            with BuildLock(path, 1.0, on_wait=waited.append):
                pass
        assert waited == [holder.pid]
    finally:
        holder.kill()
        holder.wait()
    t0 = time.monotonic()
    with BuildLock(path, 5.0):  # its owner is dead: taken at once
        assert path.read_text().split()[0] == str(os.getpid())
    assert time.monotonic() - t0 < 2.0


@pytest.mark.parametrize("value,expected", [("0", "off"), ("false", "off"), ("OFF", "off"), ("no", "off"),
                                            ("1", "on"), ("True", "on"), ("on", "on"), ("yes", "on"),
                                            ("auto", "auto"), ("", "auto"), (" Auto ", "auto")])
def test_specdec_kernels_spellings(monkeypatch, value, expected):
    monkeypatch.setenv("SPECDEC_KERNELS", value)
    assert build.kernels_setting()[1] == expected


@pytest.mark.parametrize("value", ["2", "enable", "nope", "-1"])
def test_specdec_kernels_refuses_other_values(monkeypatch, value):
    monkeypatch.setenv("SPECDEC_KERNELS", value)
    build.cpu_kernels.cache_clear()
    try:
        with pytest.raises(InvalidInputError, match=rf"SPECDEC_KERNELS='{value}' is not understood; use 0/false"):
            build.cpu_kernels()
    finally:
        build.cpu_kernels.cache_clear()


def test_off_spellings_force_the_fallback(monkeypatch):
    monkeypatch.setenv("SPECDEC_KERNELS", "off")
    build.cpu_kernels.cache_clear()
    try:
        assert build.cpu_kernels() is None
        assert build.kernel_status()["cpu"] == "fallback: SPECDEC_KERNELS=off"
    finally:
        build.cpu_kernels.cache_clear()
