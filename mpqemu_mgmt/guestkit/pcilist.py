"""Parse what ``scripts/pci_list.sh`` printed about the guest's PCI functions. Pure.

Flags are the kernel's resource flags as ``/sys/bus/pci/devices/*/resource`` shows them
(``include/linux/ioport.h``: IORESOURCE_IO 0x100, IORESOURCE_MEM 0x200, IORESOURCE_PREFETCH 0x2000,
IORESOURCE_MEM_64 0x100000). This module must not do IO.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IORESOURCE_IO = 0x100
IORESOURCE_MEM = 0x200
IORESOURCE_PREFETCH = 0x2000
IORESOURCE_MEM_64 = 0x100000


@dataclass(frozen=True)
class Bar:
    index: int
    start: int
    size: int
    flags: int

    @property
    def kind(self) -> str:
        """``"io"``, ``"mem"`` or ``"none"``."""
        if self.flags & IORESOURCE_IO:
            return "io"
        if self.flags & IORESOURCE_MEM:
            return "mem"
        return "none"


@dataclass
class PciFunction:
    bdf: str
    vendor: int
    device: int
    pci_class: int
    bars: dict[int, Bar] = field(default_factory=dict)

    @property
    def ids(self) -> str:
        return f"{self.vendor:04x}:{self.device:04x}"


def parse_pci_listing(transcript: str) -> dict[str, PciFunction]:
    """``{bdf: PciFunction}`` from the ``PCI``/``RES`` lines; BARs of size 0 are left out."""
    found: dict[str, PciFunction] = {}
    for line in transcript.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[0] == "PCI":
            found[parts[1]] = PciFunction(parts[1], int(parts[2], 16), int(parts[3], 16), int(parts[4], 16))
        elif len(parts) == 6 and parts[0] == "RES" and parts[1] in found:
            index, start, end, flags = int(parts[2]), int(parts[3], 16), int(parts[4], 16), int(parts[5], 16)
            if end:
                found[parts[1]].bars[index] = Bar(index, start, end - start + 1, flags)
    return found


def by_ids(functions: dict[str, PciFunction], vendor: int, device: int) -> list[PciFunction]:
    return [f for f in functions.values() if (f.vendor, f.device) == (vendor, device)]
