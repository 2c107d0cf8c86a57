"""Real guest, stock QEMU 7.2 proxy, our remotes: one TCG boot checks enumeration and the edu script.

Behind two stock ``x-pci-proxy-dev`` devices, each served by ``python -m mpqemu_mgmt.remote``
(seccomp enforced), a Linux guest must enumerate pci-testdev (1b36:0005, 4 KiB memory BAR0, 256-byte
I/O BAR1) and edu (1234:11e8, 1 MiB memory BAR0), and the busybox edu script — written against
QEMU's in-process ``-device edu`` — must pass against our edu: ID, liveness, factorials 0..12,
interrupt raise/ack in the device and in the PCI status Interrupt Status bit (polled: TCG cannot
deliver INTx through the 7.2 proxy), DMA RAM → device → RAM, and no DMA with Bus Master off.

Interrupt *delivery* needs KVM irqfds: :func:`test_intx_delivered_under_kvm` binds uio_pci_generic
to our edu and waits for a real interrupt; it skips where KVM cannot boot a Linux guest.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Generator, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from mpqemu_mgmt.guestkit.boot import BootResult, boot_script
from mpqemu_mgmt.guestkit.initramfs import GuestScript
from mpqemu_mgmt.guestkit.kernel import Kernel
from mpqemu_mgmt.guestkit.pcilist import IORESOURCE_IO, IORESOURCE_MEM, by_ids, parse_pci_listing
from mpqemu_mgmt.guestkit.qemu_argv import ProxyDevice
from mpqemu_mgmt.guestkit.scripts import EDU_APPEND, EDU_ENV, script_text, verdicts
from mpqemu_mgmt.testing.builtin_remote import BuiltinRemote

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 (7.2) is not installed"
)


WRAPPER = """
sh /guest/pci_list.sh
echo "--- edu_check"
sh /guest/edu_check.sh
"""


@dataclass
class GuestRun:
    result: BootResult
    testdev: BuiltinRemote
    edu: BuiltinRemote


def _boot_with_our_remotes(
    kernel: Kernel,
    tmp_path: Path,
    script: GuestScript,
    accel: str,
    *,
    modules: tuple[str, ...] = (),
    timeout: float = 90.0,
) -> Generator[GuestRun, None, None]:
    with ExitStack() as stack:
        t_remote, t_sock = stack.enter_context(
            BuiltinRemote.pair("pci-testdev", workdir=tmp_path, seccomp="enforce", name="testdev")
        )
        e_remote, e_sock = stack.enter_context(
            BuiltinRemote.pair(
                "edu", workdir=tmp_path, seccomp="enforce", name="edu", extra_args=("--log-level", "warning")
            )
        )
        result = boot_script(
            kernel,
            script,
            modules=modules,
            proxies=(ProxyDevice("t0", t_sock.fileno()), ProxyDevice("e0", e_sock.fileno())),
            append=EDU_APPEND,
            accel=accel,
            timeout=timeout,
            serial_log=tmp_path / "serial.log",
        )
        yield GuestRun(result, t_remote, e_remote)
    # the stack closed the proxy ends: both remotes must have seen EOF and exited 0 by themselves
    for remote in (t_remote, e_remote):
        assert remote.proc.returncode == 0, remote.log_text()


@pytest.fixture(scope="module")
def tcg_run(tmp_path_factory: pytest.TempPathFactory, guest_kernel: Kernel) -> Iterator[GuestRun]:
    tmp = tmp_path_factory.mktemp("edu-guest")
    script = GuestScript(
        WRAPPER,
        name="main.sh",
        env=EDU_ENV,
        files={
            "pci_list.sh": script_text("pci_list.sh").encode(),
            "edu_check.sh": script_text("edu_check.sh").encode(),
        },
    )
    yield from _boot_with_our_remotes(guest_kernel, tmp, script, "tcg")


def test_guest_enumerates_our_devices(tcg_run: GuestRun) -> None:
    funcs = parse_pci_listing(tcg_run.result.transcript)
    [testdev] = by_ids(funcs, 0x1B36, 0x0005)
    assert testdev.pci_class >> 8 == 0x00FF
    assert testdev.bars[0].size == 4096 and testdev.bars[0].flags & IORESOURCE_MEM
    assert testdev.bars[1].size == 256 and testdev.bars[1].flags & IORESOURCE_IO
    assert set(testdev.bars) == {0, 1}
    [edu] = by_ids(funcs, 0x1234, 0x11E8)
    assert edu.pci_class >> 8 == 0x00FF
    assert set(edu.bars) == {0} and edu.bars[0].size == 1 << 20 and edu.bars[0].flags & IORESOURCE_MEM


def test_edu_script_passes_against_our_edu(tcg_run: GuestRun) -> None:
    transcript = tcg_run.result.transcript
    edu_part = transcript.split("--- edu_check", 1)[-1]
    oks, fails = verdicts(edu_part)
    assert not fails, "\n".join(fails) + "\n" + tcg_run.edu.log_text()
    assert tcg_run.result.status == 0, transcript[-3000:]
    for check in (
        "id",
        "liveness",
        "factorials",
        "irq_raise",
        "intx_raised",
        "irq_ack",
        "intx_lowered",
        "fact_irq",
        "dma_roundtrip",
        "dma_bounds",
        "dma_irq",
        "dma_no_master",
    ):
        assert check in oks, f"edu check {check!r} did not run"


def test_remotes_survived_the_boot_confined(tcg_run: GuestRun) -> None:
    # seccomp was enforced: a syscall outside the allowlist would have killed them (SIGSYS)
    for remote in (tcg_run.testdev, tcg_run.edu):
        assert "Traceback" not in remote.log_text()
        assert remote.alive() or remote.proc.returncode == 0, remote.log_text()


UIO_SCRIPT = r"""
echo "1234 11e8" > /sys/bus/pci/drivers/uio_pci_generic/new_id || exit 10
[ -e /dev/uio0 ] || exit 11
d=$(ls -d /sys/bus/pci/devices/*/uio | head -n1); d=${d%/uio}
read -r bar0 _ < "$d/resource"
printf '\001\000\000\000' > /dev/uio0            # unmask (uio_pci_generic irqcontrol)
devmem $((bar0 + 0x60)) 32 1                      # edu: raise interrupt bit 0x1
timeout 10 dd if=/dev/uio0 bs=4 count=1 2>/dev/null | od -An -tu4 > /tmp/count || exit 12
echo "uio-count $(cat /tmp/count)"
devmem $((bar0 + 0x64)) 32 1
exit 0
"""


def test_intx_delivered_under_kvm(tmp_path: Path, guest_kernel: Kernel, kvm_boot: tuple[bool, str]) -> None:
    ok, reason = kvm_boot
    if not ok:
        pytest.skip(f"INTx delivery through x-pci-proxy-dev needs KVM irqfds (protocol.md §3.5): {reason}")
    runs = _boot_with_our_remotes(
        guest_kernel,
        tmp_path,
        GuestScript(UIO_SCRIPT, name="uio.sh"),
        "kvm",
        modules=("uio_pci_generic",),
        timeout=60,
    )
    run = next(runs)
    try:
        assert run.result.status == 0, run.result.transcript[-3000:]
        m = re.search(r"uio-count\s+(\d+)", run.result.transcript)
        assert m and int(m.group(1)) >= 1
    finally:
        runs.close()
