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
from mpqemu_mgmt.orchestrate.plans import Step

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
