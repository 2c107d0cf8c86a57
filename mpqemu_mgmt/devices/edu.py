"""edu: QEMU's educational PCI device (docs/specs/edu.txt, hw/misc/edu.c), INTx only.

IDs 1234:11e8 rev 0x10, class 0x00ff, INTA; BAR0 1 MiB 32-bit memory. Registers: ID 0x010000ed,
liveness (NOT of the last write), factorial with the "computing" status bit, interrupt status /
raise / acknowledge, and a DMA engine between guest RAM and a 4 KiB buffer at device address
0x40000, its bus addresses ANDed with ``dma_mask`` (default 2^28 - 1).

Deliberate differences from QEMU's edu, each because of where this one runs:

* no MSI capability: the mpqemu proxy has no MSI path (QEMU's own edu refuses to realize in
  x-remote for this reason: "MSI is not supported by interrupt controller");
* a device-side DMA range outside the buffer is refused and reported as a guest error (7.2 calls
  ``hw_error`` and aborts; later versions log and then copy out of bounds anyway);
* DMA honours Bus Master Enable and reaches guest RAM only through the bounds-checked
  :class:`~mpqemu_mgmt.devices.base.GuestMemory`; a failed transfer is reported, never raised.

The factorial worker (a thread in QEMU) is a zero-delay timer here; the DMA runs 100 ms after the
start command, like QEMU's ``timer_mod(... + 100)``. Pure: timers, memory and the IRQ line all come
from the :class:`~mpqemu_mgmt.devices.base.DeviceHost`.
"""

from __future__ import annotations

from typing import Any

from mpqemu_mgmt.devices.base import DeviceHost
from mpqemu_mgmt.devices.function import PciFunction
from mpqemu_mgmt.errors import DmaError
from mpqemu_mgmt.pci import regs
from mpqemu_mgmt.pci.config import BarKind, BarSpec, ConfigSpace

ID_VALUE = 0x010000ED
FACT_IRQ = 0x00000001
DMA_IRQ = 0x00000100
DMA_START = 0x40000
DMA_SIZE = 4096
DMA_DELAY = 0.100  # seconds; edu.c arms the DMA timer 100 ms ahead
STATUS_COMPUTING = 0x01
STATUS_IRQFACT = 0x80
DMA_RUN = 0x1
DMA_TO_PCI = 0x2  # direction bit: 1 = device buffer -> RAM
DMA_IRQ_ON_DONE = 0x4
DEFAULT_DMA_MASK = (1 << 28) - 1
BAR0_SIZE = 1 << 20

_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF


def factorial_u32(n: int) -> int:
    """n! modulo 2^32, as edu_fact_thread's ``uint32_t`` loop computes it.

    From 34 on, n! has at least 32 factors of two, so the product is 0 (this keeps a guest from
    making us loop 2^32 times).
    """
    if n >= 34:
        return 0
    ret = 1
    while n > 0:
        ret = (ret * n) & _U32
        n -= 1
    return ret


class Edu(PciFunction):
    model = "edu"

    def __init__(self, host: DeviceHost | None = None, dma_mask: int = DEFAULT_DMA_MASK) -> None:
        config = ConfigSpace(
            vendor_id=0x1234,  # PCI_VENDOR_ID_QEMU
            device_id=0x11E8,
            class_code=regs.CLASS_OTHERS,
            revision=0x10,
            interrupt_pin=1,
            bars=(BarSpec(0, BAR0_SIZE, BarKind.MEM32),),
        )
        super().__init__(host or DeviceHost(), config)
        self.dma_mask = dma_mask & _U64
        self.addr4 = 0
        self.fact = 0
        self.status_reg = 0
        self.irq_status = 0
        self.dma_src = 0
        self.dma_dst = 0
        self.dma_cnt = 0
        self.dma_cmd = 0
        self.dma_buf = bytearray(DMA_SIZE)
        self.dma_done = 0
        self.dma_failed = 0

    # -- interrupts (edu_raise_irq / edu_lower_irq without the MSI branch) -----------------------

    def _raise_irq(self, val: int) -> None:
        self.irq_status = (self.irq_status | val) & _U32
        if self.irq_status:
            self.intx.set_level(True)

    def _lower_irq(self, val: int) -> None:
        self.irq_status &= ~val & _U32
        if not self.irq_status:
            self.intx.set_level(False)

    # -- BAR0 ----------------------------------------------------------------------------------

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        mask = (1 << (8 * size)) - 1 if 0 < size <= 8 else _U64
        if bar != 0 or (offset < 0x80 and size != 4) or (offset >= 0x80 and size not in (4, 8)):
            return _U64 & mask
        val = _U64
        if offset == 0x00:
            val = ID_VALUE
        elif offset == 0x04:
            val = self.addr4
        elif offset == 0x08:
            val = self.fact
        elif offset == 0x20:
            val = self.status_reg
        elif offset == 0x24:
            val = self.irq_status
        elif offset == 0x80:
            val = self.dma_src
        elif offset == 0x88:
            val = self.dma_dst
        elif offset == 0x90:
            val = self.dma_cnt
        elif offset == 0x98:
            val = self.dma_cmd
        return val & mask

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if bar != 0 or (offset < 0x80 and size != 4) or (offset >= 0x80 and size not in (4, 8)):
            return
        value &= (1 << (8 * size)) - 1
        if offset == 0x04:
            self.addr4 = ~value & _U32
        elif offset == 0x08:
            if self.status_reg & STATUS_COMPUTING:
                return
            self.fact = value & _U32
            self.status_reg |= STATUS_COMPUTING
            self.host.timers.call_later(0.0, self._factorial_done)
        elif offset == 0x20:
            if value & STATUS_IRQFACT:
                self.status_reg |= STATUS_IRQFACT
            else:
                self.status_reg &= ~STATUS_IRQFACT
        elif offset == 0x60:
            self._raise_irq(value)
        elif offset == 0x64:
            self._lower_irq(value)
        elif offset in (0x80, 0x88, 0x90, 0x98):
            # dma_rw: every DMA register is frozen while a transfer runs
            if self.dma_cmd & DMA_RUN:
                return
            if offset == 0x80:
                self.dma_src = value
            elif offset == 0x88:
                self.dma_dst = value
            elif offset == 0x90:
                self.dma_cnt = value
            elif value & DMA_RUN:
                self.dma_cmd = value
                self.host.timers.call_later(DMA_DELAY, self._dma_timer)

    def _factorial_done(self) -> None:
        # edu_fact_thread: store the result, clear COMPUTING, then raise if IRQFACT is set
        self.fact = factorial_u32(self.fact)
        self.status_reg &= ~STATUS_COMPUTING
        if self.status_reg & STATUS_IRQFACT:
            self._raise_irq(FACT_IRQ)

    def _clamp(self, addr: int) -> int:
        res = addr & self.dma_mask
        if res != addr:
            self.host.guest_error(f"EDU: clamping DMA {addr:#018x} to {res:#018x}!")
        return res

    def _dma_timer(self) -> None:
        """edu_dma_timer, with the range check refusing instead of aborting or overflowing."""
        cmd = self.dma_cmd
        if not cmd & DMA_RUN:
            return
        to_pci = bool(cmd & DMA_TO_PCI)
        dev_addr = self.dma_src if to_pci else self.dma_dst
        cnt = self.dma_cnt
        try:
            if not (dev_addr >= DMA_START and dev_addr + cnt <= DMA_START + DMA_SIZE):
                raise DmaError(
                    f"EDU: DMA range {dev_addr:#018x}-{(dev_addr + cnt - 1) & _U64:#018x} out of bounds "
                    f"({DMA_START:#018x}-{DMA_START + DMA_SIZE - 1:#018x})!"
                )
            if not self.config.bus_master:
                # pci_dma_* go through the bus-master address space, which is disabled
                raise DmaError("EDU: DMA while Bus Master Enable is clear")
            off = dev_addr - DMA_START
            if to_pci:
                self.host.memory.write(self._clamp(self.dma_dst), self.dma_buf[off : off + cnt])
            else:
                data = self.host.memory.read(self._clamp(self.dma_src), cnt)
                self.dma_buf[off : off + cnt] = data
            self.dma_done += 1
        except DmaError as exc:
            self.dma_failed += 1
            self.host.guest_error(exc.message)
        self.dma_cmd &= ~DMA_RUN
        if self.dma_cmd & DMA_IRQ_ON_DONE:
            self._raise_irq(DMA_IRQ)

    def reset(self) -> None:
        """edu has no reset handler, so DEVICE_RESET leaves it alone (as in the stock remote)."""

    def status(self) -> dict[str, Any]:
        out = super().status()
        out.update(
            irq_status=self.irq_status,
            computing=bool(self.status_reg & STATUS_COMPUTING),
            dma={"running": bool(self.dma_cmd & DMA_RUN), "done": self.dma_done, "failed": self.dma_failed},
        )
        return out
