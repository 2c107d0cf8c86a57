"""PciAddress: a guest PCI address ``[domain:]bus:slot.function`` as a value.

Pure parsing and formatting only (used for ``addr=`` properties and reports); no IO.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mpqemu_mgmt.errors import UsageError

_RE = re.compile(r"^(?:([0-9a-fA-F]{1,4}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])$")


@dataclass(frozen=True, order=True, slots=True)
class PciAddress:
    domain: int
    bus: int
    slot: int
    function: int

    def __post_init__(self) -> None:
        if not (
            0 <= self.domain <= 0xFFFF
            and 0 <= self.bus <= 0xFF
            and 0 <= self.slot <= 0x1F
            and 0 <= self.function <= 7
        ):
            raise UsageError(f"PCI address out of range: {self!r}")

    @classmethod
    def parse(cls, text: str) -> PciAddress:
        m = _RE.match(text.strip())
        if not m:
            raise UsageError(f"not a PCI address: {text!r}", value=text)
        dom, bus, slot, fn = m.groups()
        return cls(int(dom or "0", 16), int(bus, 16), int(slot, 16), int(fn))

    @property
    def devfn(self) -> int:
        return self.slot << 3 | self.function

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}.{self.function}"
