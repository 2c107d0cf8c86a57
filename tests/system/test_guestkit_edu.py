"""The edu guest scripts, proven first against QEMU's own in-process ``-device edu`` so that every
expected value in them comes from QEMU (7.2, and 11.1 from the sid root). The emulator engineer runs
the same scripts against our remote edu.
"""

from __future__ import annotations

import re

from mpqemu_mgmt.guestkit.boot import BootResult, boot_script
from mpqemu_mgmt.guestkit.kernel import Kernel
from mpqemu_mgmt.guestkit.qemu11 import Qemu11
from mpqemu_mgmt.guestkit.scripts import EDU_APPEND, EDU_ENV, guest_script, verdicts

EDU_CHECKS = {
    "find", "bar0_size", "command", "id", "liveness", "liveness_zero", "factorials", "irq_idle",
    "intx_idle", "irq_raise", "intx_raised", "irq_raise_more", "irq_partial_ack", "irq_ack",
    "intx_lowered", "fact_irq", "dma_roundtrip", "dma_bounds", "dma_irq", "dma_no_master",
}


def _check_edu(result: BootResult) -> None:
    passed, failed = verdicts(result.transcript)
    assert failed == [], result.transcript
    assert passed == EDU_CHECKS, result.transcript
    assert result.status == 0


def test_edu_check_against_in_process_edu_72(guest_kernel: Kernel, qemu72: str) -> None:
    result = boot_script(guest_kernel, guest_script("edu_check.sh", EDU_ENV), devices=["edu,id=edu0"],
                         append=EDU_APPEND, timeout=60)
    _check_edu(result)


def test_edu_check_against_in_process_edu_111(guest_kernel: Kernel, qemu11: Qemu11) -> None:
    result = boot_script(guest_kernel, guest_script("edu_check.sh", EDU_ENV), devices=["edu,id=edu0"],
                         append=EDU_APPEND, qemu_argv_prefix=qemu11.argv_prefix(), timeout=60)
    _check_edu(result)


def test_edu_check_catches_a_device_without_dma(guest_kernel: Kernel, qemu72: str) -> None:
    """The script can fail: an edu whose DMA cannot reach the window (dma_mask=0 clamps every bus
    address to 0, hw/misc/edu.c edu_clamp_addr) fails the round trip, and only DMA checks fail."""
    result = boot_script(guest_kernel, guest_script("edu_check.sh", EDU_ENV),
                         devices=["edu,id=edu0,dma_mask=0"], append=EDU_APPEND, timeout=60)
    passed, failed = verdicts(result.transcript)
    assert result.status == len(failed) >= 1
    assert any(line.startswith("FAIL dma_roundtrip") for line in failed), result.transcript
    assert EDU_CHECKS - passed <= {"dma_roundtrip", "dma_bounds", "dma_no_master"}


def test_edu_interrupt_delivery_through_uio(guest_kernel: Kernel, qemu72: str) -> None:
    """INTx of an in-process edu reaches the guest kernel (uio_pci_generic, /proc/interrupts)."""
    result = boot_script(guest_kernel, guest_script("edu_irq_uio.sh"), devices=["edu,id=edu0"],
                         modules=["uio_pci_generic"], append=EDU_APPEND, timeout=60)
    assert result.status == 0, result.transcript
    for check in ("bind", "event1", "event2", "proc_interrupts"):
        assert re.search(rf"^ok {check}\b", result.transcript, re.M), result.transcript
