"""INTx over the SET_IRQFD eventfd pair: the remote end of QEMU's irqfd + resamplefd.

What it is: the IO shell that implements :class:`~mpqemu_mgmt.devices.base.IrqLine` for the mpqemu
remote. It receives the *effective* level (after Interrupt Disable, see
:class:`~mpqemu_mgmt.pci.intx.IntxPin`) and, as hw/remote/iohub.c does:

* writes the irqfd when the level rises (KVM asserts the GSI; it stays asserted until the guest
  EOIs, there is no de-assert message);
* lowering the level writes nothing: the line drops at the next EOI and is simply not re-raised;
* on each resample event (KVM signals the resamplefd on EOI) drains the resamplefd and writes the
  irqfd again if the level is still high.

One deliberate difference: when a new SET_IRQFD replaces the pair while the level is high, the new
irqfd is written at once (iohub.c keeps silent, so a pending interrupt would be lost until the next
edge).

What it must not do: block (both eventfds are used non-blocking), or send anything on the mpqemu
socket (interrupts never travel there).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from mpqemu_mgmt.protocol.fds import OwnedFd

_ONE = (1).to_bytes(8, "little")


class EventfdIrq:
    """The device's INTA as seen through the latest SET_IRQFD pair."""

    def __init__(self, log: Callable[[str], None] | None = None) -> None:
        self._irqfd: OwnedFd | None = None
        self._resamplefd: OwnedFd | None = None
        self.level = False
        self.asserts = 0  # irqfd writes
        self.resamples = 0
        self._log = log or (lambda _m: None)

    def attach(self, irqfd: OwnedFd, resamplefd: OwnedFd) -> None:
        """Adopt a SET_IRQFD pair, closing the previous one."""
        self.close()
        os.set_blocking(irqfd.fileno(), False)
        os.set_blocking(resamplefd.fileno(), False)
        self._irqfd, self._resamplefd = irqfd, resamplefd
        if self.level:
            self._signal()

    @property
    def resample_fileno(self) -> int | None:
        return None if self._resamplefd is None else self._resamplefd.fileno()

    @property
    def attached(self) -> bool:
        return self._irqfd is not None

    def set_level(self, level: bool) -> None:
        """IrqLine: the effective INTx level."""
        rising = level and not self.level
        self.level = level
        if rising:
            self._signal()

    def on_resample(self) -> None:
        """The resamplefd became readable: drain it, re-assert if still high."""
        if self._resamplefd is None:
            return
        try:
            os.read(self._resamplefd.fileno(), 8)
        except BlockingIOError:
            return
        self.resamples += 1
        if self.level:
            self._signal()

    def _signal(self) -> None:
        if self._irqfd is None:
            return
        try:
            os.write(self._irqfd.fileno(), _ONE)
            self.asserts += 1
        except BlockingIOError:
            # counter at its maximum: the line is asserted already
            pass
        except OSError as exc:
            self._log(f"irqfd write failed: {exc}")

    def close(self) -> None:
        for f in (self._irqfd, self._resamplefd):
            if f is not None:
                f.close()
        self._irqfd = self._resamplefd = None
