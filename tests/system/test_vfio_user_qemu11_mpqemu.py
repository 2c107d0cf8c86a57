"""Issue 9 item 4, second half: the same in-tree devices over *mpqemu* on QEMU 11.1.

Found here: QEMU 11.1.3's ``x-pci-proxy-dev`` (Debian sid) segfaults at start-up under TCG — a read
at NULL+0x38, before any guest code, also paused (-S) and also with QEMU 7.2's stock ``x-remote`` as
the peer, so it is QEMU's proxy, not our remote. With ``-accel kvm`` it realizes; this host's KVM
runs SeaBIOS (which sizes and programs the BARs) but cannot boot Linux, so the mpqemu check on
11.1 is BIOS-level: both our devices (confined, seccomp enforce) realize and decode the right BARs.
The real-guest checks on 11.1 are over vfio-user (test_vfio_user_qemu11.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from mpqemu_mgmt.guestkit.qemu11 import Qemu11
from mpqemu_mgmt.testing.builtin_remote import BuiltinRemote


def _run(qemu: Qemu11, tmp: Path, accel: str, extra: tuple[str, ...] = ()) -> tuple[int, str]:
    """Start QEMU 11.1 with our pci-testdev and edu over mpqemu, ask HMP ``info pci``, quit."""
    with ExitStack() as stack:
        _, t_sock = stack.enter_context(
            BuiltinRemote.pair("pci-testdev", workdir=tmp, seccomp="enforce", name="testdev")
        )
        _, e_sock = stack.enter_context(BuiltinRemote.pair("edu", workdir=tmp, seccomp="enforce", name="edu"))
        argv = [
            *qemu.command(),
            "-nodefaults", "-display", "none", "-accel", accel,
            "-object", "memory-backend-memfd,id=mem,size=128M,share=on",
            "-machine", "pc,memory-backend=mem", "-m", "128M", "-monitor", "stdio",
            "-device", f"x-pci-proxy-dev,id=t0,fd={t_sock.fileno()}",
            "-device", f"x-pci-proxy-dev,id=e0,fd={e_sock.fileno()}",
            *extra,
        ]  # fmt: skip
        proc = subprocess.Popen(
            argv, pass_fds=(t_sock.fileno(), e_sock.fileno()),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        # give SeaBIOS time to size and program the BARs before asking
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(3)
        try:
            out, _ = proc.communicate(b"info pci\nquit\n", timeout=30)
        except (BrokenPipeError, ValueError):
            out = proc.stdout.read() if proc.stdout else b""
            proc.wait(30)
        return proc.returncode, out.decode(errors="replace")


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("mpqemu-on-11")


def test_qemu11_kvm_realizes_our_mpqemu_devices_with_their_bars(tmp: Path, qemu11: Qemu11) -> None:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("no usable /dev/kvm: QEMU 11.1's x-pci-proxy-dev only starts under KVM here")
    rc, out = _run(qemu11, tmp, "kvm")
    if "failed to initialize kvm" in out.lower() or "could not access kvm" in out.lower():
        pytest.skip(f"KVM unusable here: {out[-300:]}")
    assert rc == 0, out[-2000:]
    blocks = re.split(r"\n\s*Bus\s+\d+, device", out)
    t0 = next(b for b in blocks if 'id "t0"' in b)
    e0 = next(b for b in blocks if 'id "e0"' in b)
    assert re.search(r"BAR0: 32 bit memory at 0x[0-9a-f]+ \[0x[0-9a-f]+\]", t0), t0
    bar = re.search(r"BAR0: 32 bit memory at (0x[0-9a-f]+) \[(0x[0-9a-f]+)\]", t0)
    assert bar and int(bar.group(2), 16) - int(bar.group(1), 16) + 1 == 4096
    io = re.search(r"BAR1: I/O at (0x[0-9a-f]+) \[(0x[0-9a-f]+)\]", t0)
    assert io and int(io.group(2), 16) - int(io.group(1), 16) + 1 == 256
    ebar = re.search(r"BAR0: 32 bit memory at (0x[0-9a-f]+) \[(0x[0-9a-f]+)\]", e0)
    assert ebar and int(ebar.group(2), 16) - int(ebar.group(1), 16) + 1 == 1 << 20


def test_qemu11_tcg_proxy_crash_is_qemus(tmp: Path, qemu11: Qemu11) -> None:
    rc, out = _run(qemu11, tmp, "tcg", ("-S",))
    if rc in (-11, 139):  # 139: bwrap reports the signal as 128 + SIGSEGV
        pytest.xfail("QEMU 11.1.3 x-pci-proxy-dev segfaults at start-up under TCG (NULL+0x38), "
                     "with any mpqemu peer; see the module docstring")
    assert rc == 0, out[-2000:]
