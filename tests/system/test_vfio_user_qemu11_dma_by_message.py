"""vfio-user DMA *by message* with QEMU 11.1's real client: guest RAM without an fd.

With ``memory-backend-ram`` QEMU has no fd to pass in DMA_MAP, so our edu reaches guest memory
only through DMA_READ/DMA_WRITE messages — while a vCPU may be waiting on us with the BQL held
(the serve loop answers region accesses while it waits for the DMA reply). The guest runs the same
edu_check.sh as elsewhere; its DMA round trip must pass, and the remote's session summary must show
that DMA went by message. (This test found that QEMU 11.1.3 lays DMA_READ/WRITE out as
vfio-user.rst says — data at byte 16 — not as some QEMU source snapshots declare.)
"""

from __future__ import annotations

import re
from pathlib import Path

from mpqemu_mgmt.guestkit.boot import boot_script
from mpqemu_mgmt.guestkit.initramfs import GuestScript
from mpqemu_mgmt.guestkit.kernel import Kernel
from mpqemu_mgmt.guestkit.qemu11 import Qemu11
from mpqemu_mgmt.guestkit.scripts import EDU_APPEND, EDU_ENV, script_text
from mpqemu_mgmt.testing.vfio_user_remote import VfioUserRemote


def _ram_without_fd_wrapper(path: Path, prefix: list[str]) -> Path:
    """A QEMU argv prefix that swaps the kit's memfd RAM backend for anonymous RAM."""
    path.write_text(
        "#!/bin/sh\n"
        "n=$#; i=0\n"
        "while [ $i -lt $n ]; do a=$1; shift; i=$((i + 1))\n"
        "  case $a in memory-backend-memfd,*)\n"
        "    a=$(echo \"$a\" | sed -e 's/memory-backend-memfd/memory-backend-ram/' -e 's/,share=on//');;\n"
        "  esac\n"
        "  set -- \"$@\" \"$a\"\n"
        "done\n"
        "exec " + " ".join(f"'{a}'" for a in prefix) + ' "$@"\n'
    )
    path.chmod(0o755)
    return path


def test_edu_dma_by_message_with_qemu_11_1(tmp_path: Path, qemu11: Qemu11, guest_kernel: Kernel) -> None:
    script = GuestScript(
        "sh /guest/edu_check.sh",
        name="main.sh",
        env=EDU_ENV,
        files={"edu_check.sh": script_text("edu_check.sh").encode()},
    )
    with VfioUserRemote("edu", "vedu0", workdir=tmp_path, extra_args=("--log-level", "info")) as edu:
        wrapper = _ram_without_fd_wrapper(tmp_path / "qemu-ram.sh", qemu11.argv_prefix(binds=[edu.dir]))
        result = boot_script(
            guest_kernel,
            script,
            devices=(edu.device_json(),),
            append=EDU_APPEND,
            qemu_binary=qemu11.binary,
            qemu_argv_prefix=[str(wrapper)],
            timeout=120,
            serial_log=tmp_path / "serial.log",
        )
        proc = edu.wait_connected(5)
        assert proc.wait(20) == 0
        log = edu.stderr()
    out = result.transcript
    for check in ("id", "dma_roundtrip", "dma_bounds", "dma_irq", "dma_no_master"):
        assert re.search(rf"^ok {check}\b", out, re.M), f"{check}:\n{out[-3000:]}\n{log}"
    assert result.status == 0, out[-3000:]
    m = re.search(r"DMA by message (\d+) reads (\d+) writes", log)
    assert m and int(m.group(1)) >= 1 and int(m.group(2)) >= 1, log
