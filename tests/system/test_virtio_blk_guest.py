"""A real Linux guest behind a stock 7.2 ``x-pci-proxy-dev`` sees our virtio-blk remote.

* TCG (runs here): the guest enumerates 1af4:1001 / subsystem 1af4:0002 / class 0x010000 with a
  128-byte I/O BAR0, and reads the legacy registers through the proxy from user space (sysfs
  ``resource0``): host features, queue size, capacity. The guest's virtio_blk driver is *not*
  loaded: without KVM irqfds no interrupt reaches the guest (protocol.md §3.5), so its first
  request would wait forever.
* KVM: the guest's own virtio_pci + virtio_blk drivers bind, ``dd`` a pattern out to /dev/vda and
  back, and the backing file on the host must hold it. Skips where KVM cannot boot a Linux guest.
"""

from __future__ import annotations

import hashlib
import random
import re
import shutil
from collections.abc import Generator
from contextlib import ExitStack
from pathlib import Path

import pytest

from mpqemu_mgmt.guestkit.boot import BootResult, boot_script
from mpqemu_mgmt.guestkit.initramfs import GuestScript
from mpqemu_mgmt.guestkit.kernel import Kernel
from mpqemu_mgmt.guestkit.pcilist import IORESOURCE_IO, by_ids, parse_pci_listing
from mpqemu_mgmt.guestkit.qemu_argv import ProxyDevice
from mpqemu_mgmt.guestkit.scripts import script_text
from mpqemu_mgmt.testing.virtio_blk_remotes import BuiltinBlkRemote, builtin_blk

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 (7.2) is not installed"
)

IMAGE = 16 << 20
SECTORS = IMAGE // 512

REGS_SCRIPT = r"""
sh /guest/pci_list.sh
for d in /sys/bus/pci/devices/*; do
  [ "$(cat $d/vendor) $(cat $d/device)" = "0x1af4 0x1001" ] || continue
  r=$d/resource0
  feat=$(dd if=$r bs=4 count=1 skip=0 2>/dev/null | od -An -tu4)
  qnum=$(dd if=$r bs=2 count=1 skip=6 2>/dev/null | od -An -tu2)
  caplo=$(dd if=$r bs=4 count=1 skip=5 2>/dev/null | od -An -tu4)
  echo "VIRTIO feat=$((feat)) qnum=$((qnum)) cap=$((caplo))"
done
"""

DD_SCRIPT = r"""
ls /sys/block
[ -b /dev/vda ] || { echo "no /dev/vda"; exit 20; }
echo "SIZE $(cat /sys/block/vda/size)"
dd if=/guest/pattern of=/dev/vda bs=4096 seek=16 conv=fsync 2>/dev/null || exit 21
echo 3 > /proc/sys/vm/drop_caches
echo "BACK $(dd if=/dev/vda bs=4096 skip=16 count=256 2>/dev/null | md5sum)"
echo "WANT $(md5sum < /guest/pattern)"
"""


def _boot(
    kernel: Kernel,
    tmp_path: Path,
    script: GuestScript,
    accel: str,
    *,
    modules: tuple[str, ...] = (),
    timeout: float = 90.0,
) -> Generator[tuple[BootResult, BuiltinBlkRemote, Path], None, None]:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(IMAGE))
    with ExitStack() as stack:
        remote, sock = stack.enter_context(builtin_blk(image, workdir=tmp_path, seccomp="enforce"))
        result = boot_script(
            kernel,
            script,
            modules=modules,
            proxies=(ProxyDevice("vb0", sock.fileno()),),
            accel=accel,
            timeout=timeout,
            serial_log=tmp_path / "serial.log",
        )
        yield result, remote, image
    assert remote.proc.returncode == 0, remote.log_text()


def test_guest_enumerates_and_reads_registers_tcg(guest_kernel: Kernel, tmp_path: Path) -> None:
    script = GuestScript(
        REGS_SCRIPT, name="regs.sh", files={"pci_list.sh": script_text("pci_list.sh").encode()}
    )
    runs = _boot(guest_kernel, tmp_path, script, "tcg")
    result, remote, _ = next(runs)
    try:
        assert result.status == 0, result.transcript[-3000:]
        [blk] = by_ids(parse_pci_listing(result.transcript), 0x1AF4, 0x1001)
        assert blk.pci_class == 0x010000
        assert set(blk.bars) == {0}
        assert blk.bars[0].size == 128 and blk.bars[0].flags & IORESOURCE_IO
        m = re.search(r"VIRTIO feat=(\d+) qnum=(\d+) cap=(\d+)", result.transcript)
        assert m, result.transcript[-2000:]
        feat, qnum, cap = (int(g) for g in m.groups())
        assert feat & (1 << 9) and feat & (1 << 28)  # FLUSH, INDIRECT_DESC
        assert qnum == 256
        assert cap == SECTORS  # low dword of capacity (config offset 0 at BAR offset 0x14)
        assert remote.alive(), remote.log_text()
    finally:
        runs.close()


def test_guest_virtio_blk_dd_roundtrip_kvm(
    kvm_boot: tuple[bool, str], guest_kernel: Kernel, tmp_path: Path
) -> None:
    ok, reason = kvm_boot
    if not ok:
        pytest.skip(f"the guest's virtio_blk needs interrupts; x-pci-proxy-dev has only KVM irqfds: {reason}")
    pattern = random.Random(11).randbytes(256 * 4096)
    script = GuestScript(DD_SCRIPT, name="dd.sh", files={"pattern": pattern})
    runs = _boot(guest_kernel, tmp_path, script, "kvm", modules=("virtio_pci", "virtio_blk"), timeout=90)
    result, _remote, image = next(runs)
    try:
        assert result.status == 0, result.transcript[-3000:]
        assert f"SIZE {SECTORS}" in result.transcript
        want = hashlib.md5(pattern).hexdigest()
        assert re.search(rf"BACK {want}", result.transcript), result.transcript[-2000:]
    finally:
        runs.close()
    assert image.read_bytes()[16 * 4096 : 16 * 4096 + len(pattern)] == pattern
