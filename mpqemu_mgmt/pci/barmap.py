"""BarMap: the one place that turns a bus address into ``(bar, offset)``.

The mpqemu proxy sends **absolute** guest addresses for BAR accesses (hw/remote/proxy.c
``send_bar_access_msg`` sends ``mr->addr + offset``), and QEMU's own x-remote resolves them through
its address spaces, where each BAR sits wherever the guest programmed it and only while the
command register enables its decode (hw/remote/message.c ``process_bar_read`` →
``address_space_rw``). :meth:`BarMap.resolve` reproduces that lookup from the windows that
:class:`~mpqemu_mgmt.pci.config.ConfigSpace` keeps up to date, so every serve loop shares it.

A transport that addresses BARs by region index (vfio-user ``REGION_READ``) uses
:meth:`BarMap.check_region` instead: same bounds rule, no address decode.

What it must not do: IO, or touch the config space (it only reads its decoded windows).
"""

from __future__ import annotations

from mpqemu_mgmt.pci.config import ConfigSpace

# x86 port I/O is 64 KiB: QEMU's "io" root region (softmmu/physmem.c memory_map_init) ends there,
# so an I/O BAR programmed above it decodes nowhere.
IO_SPACE_SIZE = 0x10000


class BarMap:
    """Resolve accesses against the BAR windows of one config space."""

    __slots__ = ("_config",)

    def __init__(self, config: ConfigSpace) -> None:
        self._config = config

    def resolve(self, addr: int, size: int, memory: bool) -> tuple[int, int] | None:
        """``(bar, offset)`` for an access of ``size`` bytes at absolute ``addr``, or None.

        None when no decoded BAR of that space (memory or I/O) holds the whole access: the BAR is
        not programmed there, its decode bit in the command register is off, the access runs
        past the end of the BAR, or it is port I/O above 64 KiB.
        """
        if size <= 0 or (not memory and addr + size > IO_SPACE_SIZE):
            return None
        for win in self._config.windows:
            if win.memory is memory and win.base <= addr and addr + size <= win.base + win.size:
                return win.index, addr - win.base
        return None

    @staticmethod
    def port_exists(addr: int, size: int) -> bool:
        """Whether a port I/O access lies inside the 64 KiB I/O space at all."""
        return addr >= 0 and addr + size <= IO_SPACE_SIZE

    def check_region(self, bar: int, offset: int, size: int) -> bool:
        """True if ``[offset, offset + size)`` lies inside declared BAR ``bar`` (no decode check)."""
        spec = self._config.bars.get(bar)
        return spec is not None and size > 0 and offset >= 0 and offset + size <= spec.size
