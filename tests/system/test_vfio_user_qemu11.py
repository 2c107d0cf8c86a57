"""The headline of issue 9: QEMU 11.1's own vfio-user-pci client, a real Linux guest under TCG,
and our confined remotes serving virtio-blk and edu over vfio-user with working interrupts.

One boot checks everything (suite budget): the guest's own virtio_blk driver writes a pattern with
dd and reads it back, the host checks the backing file, and /proc/interrupts shows the virtio
line counting; edu is bound to uio_pci_generic and two raised interrupts arrive in the guest.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from mpqemu_mgmt.guestkit.boot import BootResult, boot_script
from mpqemu_mgmt.guestkit.initramfs import GuestScript
from mpqemu_mgmt.guestkit.kernel import Kernel
from mpqemu_mgmt.guestkit.qemu11 import Qemu11
from mpqemu_mgmt.guestkit.scripts import EDU_APPEND, EDU_ENV, script_text, verdicts
from mpqemu_mgmt.testing.vfio_user_remote import VfioUserRemote

DISK_BYTES = 16 << 20
SEEK_BLOCKS = 16  # the pattern lands at 16 * 4096 in the backing file
PATTERN_LINE = "MPQEMU-VFIO-USER-PATTERN-0123456789\n"
PATTERN_BYTES = 64 * 1024


def expected_pattern() -> bytes:
    text = PATTERN_LINE * (PATTERN_BYTES // len(PATTERN_LINE) + 1)
    return text.encode()[:PATTERN_BYTES]


BLK_SCRIPT = f"""
fail=0
ok() {{ echo "ok $*"; }}
bad() {{ echo "FAIL $*"; fail=$((fail + 1)); }}
tries=0
while [ ! -b /dev/vda ] && [ $tries -lt 100 ]; do usleep 50000; tries=$((tries + 1)); done
[ -b /dev/vda ] || {{ bad vda "no /dev/vda"; ls /sys/bus/pci/devices; exit 9; }}
ok vda "$(cat /sys/block/vda/size) sectors"
irqs() {{ awk '/virtio/ {{ for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) t += $i }} \\
  END {{ print t + 0 }}' /proc/interrupts; }}
before=$(irqs)
yes "{PATTERN_LINE.strip()}" | head -c {PATTERN_BYTES} > /tmp/pattern
dd if=/tmp/pattern of=/dev/vda bs=4096 seek={SEEK_BLOCKS} conv=fsync 2>/dev/null && ok dd_out || bad dd_out
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back bs=4096 skip={SEEK_BLOCKS} count={PATTERN_BYTES // 4096} 2>/dev/null \\
  && ok dd_in || bad dd_in
cmp /tmp/pattern /tmp/back && ok readback || bad readback
after=$(irqs)
[ "$after" -gt "$before" ] && ok virtio_interrupts "$before -> $after" \\
  || bad virtio_interrupts "$before -> $after"
grep virtio /proc/interrupts
echo "--- edu_check"
sh /guest/edu_check.sh || fail=$((fail + $?))
echo "--- edu_irq"
sh /guest/edu_irq_uio.sh || fail=$((fail + $?))
exit $fail
"""


@dataclass
class Run:
    result: BootResult
    disk: Path
    blk_rc: int | None
    edu_rc: int | None
    blk_stderr: str


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory, qemu11: Qemu11, guest_kernel: Kernel) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("vfio-user-guest")
    disk = tmp / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(DISK_BYTES)
    script = GuestScript(
        BLK_SCRIPT,
        name="main.sh",
        env=EDU_ENV,
        files={name: script_text(name).encode() for name in ("edu_irq_uio.sh", "edu_check.sh")},
    )
    with ExitStack() as stack:
        blk = stack.enter_context(VfioUserRemote("virtio-blk", "vblk0", backing=disk, workdir=tmp))
        edu = stack.enter_context(VfioUserRemote("edu", "vedu0", workdir=tmp))
        result = boot_script(
            guest_kernel,
            script,
            modules=("virtio_pci", "virtio_blk", "uio", "uio_pci_generic"),
            devices=(blk.device_json(), edu.device_json()),
            append=EDU_APPEND,
            accel="tcg",
            qemu_binary="qemu-system-x86_64",
            qemu_argv_prefix=qemu11.argv_prefix(binds=[blk.dir, edu.dir]),
            timeout=120,
            serial_log=tmp / "serial.log",
        )
        blk_stderr = blk.stderr()
        blk_rc, edu_rc = blk.close(), edu.close()
    yield Run(result, disk, blk_rc, edu_rc, blk_stderr)


def test_guest_virtio_blk_driver_over_vfio_user_with_interrupts(guest: Run) -> None:
    out = guest.result.transcript
    assert "ok vda" in out, out[-3000:]
    for check in ("dd_out", "dd_in", "readback", "virtio_interrupts"):
        assert re.search(rf"^ok {check}\b", out, re.M), f"{check} failed:\n{out[-3000:]}"
    with open(guest.disk, "rb") as f:
        f.seek(SEEK_BLOCKS * 4096)
        assert f.read(PATTERN_BYTES) == expected_pattern()


def test_edu_check_passes_over_vfio_user(guest: Run) -> None:
    """The same edu_check.sh that passes against QEMU's in-process edu (DMA through the memfd)."""
    part = guest.result.transcript.split("--- edu_check", 1)[-1].split("--- edu_irq", 1)[0]
    oks, fails = verdicts(part)
    assert not fails, "\n".join(fails)
    for check in ("id", "liveness", "factorials", "irq_raise", "intx_raised", "irq_ack", "intx_lowered",
                  "fact_irq", "dma_roundtrip", "dma_bounds", "dma_irq", "dma_no_master"):
        assert check in oks, f"edu check {check!r} did not run"


def test_guest_receives_edu_interrupts_through_uio(guest: Run) -> None:
    out = guest.result.transcript
    for check in ("bind", "event1", "event2", "proc_interrupts"):
        assert re.search(rf"^ok {check}\b", out, re.M), f"{check} failed:\n{out[-3000:]}"


def test_whole_script_passed_and_remotes_exited_cleanly(guest: Run) -> None:
    assert guest.result.status == 0, guest.result.transcript[-3000:]
    assert guest.blk_rc == 0 and guest.edu_rc == 0, guest.blk_stderr
