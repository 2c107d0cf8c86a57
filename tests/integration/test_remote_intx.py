"""INTx at the eventfd level: our edu remote behind ProxySim, with real irqfd/resamplefd eventfds.

What the KVM side would see (protocol.md §3.5, hw/remote/iohub.c): an irqfd write when the
effective level rises, nothing when it falls, a re-assert after a resample only while the level is
still high, and Interrupt Disable (command bit 10) gating the line while status bit 3 keeps showing
the device's level.
"""

from __future__ import annotations

import os
import select
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpqemu_mgmt.protocol import OwnedFd
from mpqemu_mgmt.testing.builtin_remote import BuiltinRemote
from mpqemu_mgmt.testing.proxysim import ProxySim

RAISE, ACK, IRQ_STATUS = 0x60, 0x64, 0x24
COMMAND, STATUS = 0x04, 0x06
INTX_DISABLE, STATUS_INTERRUPT = 0x400, 0x08


def fired(fd: OwnedFd, timeout: float) -> int:
    """The irqfd counter accumulated within ``timeout`` seconds (0 = not signalled)."""
    r, _, _ = select.select([fd.fileno()], [], [], timeout)
    if not r:
        return 0
    return int.from_bytes(os.read(fd.fileno(), 8), "little")


def resample(fd: OwnedFd) -> None:
    os.write(fd.fileno(), (1).to_bytes(8, "little"))


@pytest.fixture
def edu(tmp_path: Path) -> Iterator[ProxySim]:
    with (
        BuiltinRemote.pair("edu", workdir=tmp_path, seccomp="enforce") as (remote, sock),
        ProxySim(sock) as px,
    ):
        px.map_bars()
        yield px
        assert "Traceback" not in remote.log_text()


def status_bit(px: ProxySim) -> bool:
    return bool(px.config_read(STATUS, 2) & STATUS_INTERRUPT)


def test_pin_and_assert_deassert_resample(edu: ProxySim) -> None:
    assert edu.config_read(0x3D, 1) == 1  # INTA
    irq, rs = edu.set_irqfd()
    assert fired(irq, 0.1) == 0
    edu.bar_write_at(0, RAISE, 0x1, 4)
    assert fired(irq, 2) == 1
    assert status_bit(edu)
    # level still high: each resample (guest EOI) re-asserts
    for _ in range(3):
        resample(rs)
        assert fired(irq, 2) == 1
    # raising more bits while high is not a new edge
    edu.bar_write_at(0, RAISE, 0x2, 4)
    assert fired(irq, 0.1) == 0
    # a partial ack keeps the line up; the full ack lowers it without any message
    edu.bar_write_at(0, ACK, 0x1, 4)
    assert status_bit(edu)
    edu.bar_write_at(0, ACK, 0x2, 4)
    assert not status_bit(edu)
    assert edu.bar_read_at(0, IRQ_STATUS, 4) == 0
    assert fired(irq, 0.1) == 0
    resample(rs)
    assert fired(irq, 0.3) == 0
    # and the next raise is a new edge
    edu.bar_write_at(0, RAISE, 0x100, 4)
    assert fired(irq, 2) == 1
    irq.close()
    rs.close()


def test_interrupt_disable(edu: ProxySim) -> None:
    irq, rs = edu.set_irqfd()
    cmd = edu.config_read(COMMAND, 2)
    edu.config_write(COMMAND, cmd | INTX_DISABLE, 2)
    edu.bar_write_at(0, RAISE, 0x1, 4)
    assert fired(irq, 0.3) == 0
    assert status_bit(edu)  # the status bit shows the device's level regardless
    resample(rs)
    assert fired(irq, 0.3) == 0
    edu.config_write(COMMAND, cmd, 2)  # re-enable: the pending level goes out
    assert fired(irq, 2) == 1
    edu.config_write(COMMAND, cmd | INTX_DISABLE, 2)  # masked while asserted: no re-assert
    resample(rs)
    assert fired(irq, 0.3) == 0
    edu.bar_write_at(0, ACK, 0x1, 4)
    edu.config_write(COMMAND, cmd, 2)
    assert fired(irq, 0.3) == 0  # nothing pending any more
    irq.close()
    rs.close()


def test_new_irqfd_pair_while_asserted(edu: ProxySim) -> None:
    irq1, rs1 = edu.set_irqfd()
    edu.bar_write_at(0, RAISE, 0x4, 4)
    assert fired(irq1, 2) == 1
    irq2, rs2 = edu.set_irqfd()  # routing changed (e.g. PIRQ reprogrammed): the level carries over
    assert fired(irq2, 2) == 1
    resample(rs2)
    assert fired(irq2, 2) == 1
    assert fired(irq1, 0.1) == 0
    for f in (irq1, rs1, irq2, rs2):
        f.close()


def test_factorial_interrupt(edu: ProxySim) -> None:
    irq, rs = edu.set_irqfd()
    edu.bar_write_at(0, 0x20, 0x80, 4)
    edu.bar_write_at(0, 0x08, 5, 4)
    assert fired(irq, 2) == 1
    assert edu.bar_read_at(0, 0x08, 4) == 120
    assert edu.bar_read_at(0, IRQ_STATUS, 4) == 1
    irq.close()
    rs.close()
