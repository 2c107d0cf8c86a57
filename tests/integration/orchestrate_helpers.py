"""Shared bits of the orchestration tests: short state roots, process scans, fault injection."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mpqemu_mgmt.errors import OrchestrationError
from mpqemu_mgmt.orchestrate.driver import GuestDriver
from mpqemu_mgmt.orchestrate.plans import Step
from mpqemu_mgmt.orchestrate.runtime import GuestRuntime
from mpqemu_mgmt.procfs import pid_alive

QEMU = shutil.which("qemu-system-x86_64")


def short_root(prefix: str = "mpqo-") -> Path:
    """A state root short enough for AF_UNIX paths (108 bytes) and traversable by the QEMU user."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    root.chmod(0o711)
    return root


def processes_under(root: Path) -> list[tuple[int, str]]:
    """Live processes whose command line mentions ``root`` (our QEMUs and remotes do)."""
    found = []
    needle = str(root)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in raw.decode(errors="replace") and state != "Z":
            found.append((int(entry), raw.replace(b"\0", b" ").decode(errors="replace")[:200]))
    return found


class Injected(OrchestrationError):
    """The failure a test injects before a plan step (a driver's ``before_step`` hook)."""


def inject_before(at: int) -> Callable[[int, Step], None]:
    """A ``before_step`` hook that raises :class:`Injected` before step ``at`` of each plan."""

    def hook(index: int, step: Step) -> None:
        if index == at:
            raise Injected(f"injected before step {index} ({step.op.value} {step.command or ''})")

    return hook


async def force_stop(driver: GuestDriver, runtime: GuestRuntime) -> list[int]:
    """``stop --force`` the guest; the pids it had (main QEMU, every remote), for :func:`assert_gone`."""
    pids = [runtime.pid, *(r.pid for r in runtime.remotes.values())]
    await driver.stop(runtime, force=True)
    return pids


def assert_gone(pids: list[int], root: Path) -> None:
    """None of ``pids`` runs, and no process of ours under ``root`` is left."""
    for pid in pids:
        assert not pid_alive(pid)
    assert processes_under(root) == []


def kill_all_under(root: Path) -> None:
    for pid, _ in processes_under(root):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def state_root() -> Iterator[Path]:
    if QEMU is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    root = short_root()
    yield root
    leftover = processes_under(root)
    kill_all_under(root)
    shutil.rmtree(root, ignore_errors=True)
    assert not leftover, f"processes left behind: {leftover}"
