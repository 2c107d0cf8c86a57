"""Guest RAM as the remote sees it: the SYNC_SYSMEM fds, mapped, with bounds-checked DMA.

What it is: the IO shell behind :class:`~mpqemu_mgmt.devices.base.GuestMemory`. Every SYNC_SYSMEM
replaces the whole map (hw/remote/memory.c ``remote_sysmem_reconfig`` deletes every RAM subregion
and maps each entry again); because the proxy sends one on every memory-topology commit of the
guest, an identical map — same ``(st_dev, st_ino, offset, size, gpa)`` per region — is kept as it
is and the new fds are just closed.

Safety rules (a guest chooses DMA addresses and counts):

* every access is checked against the mapped regions before a byte moves; anything outside guest
  RAM raises :class:`~mpqemu_mgmt.errors.DmaError` and touches nothing;
* a region is mapped only if its file really holds ``offset + size`` bytes (``fstat``), so a short
  memfd can never turn a guest DMA into SIGBUS;
* regions are mapped read/write, ``MAP_SHARED``, never executable.

What it must not do: map anything it was not sent, keep a received fd open after mapping it, or
hand out a view across a region boundary. Callers must not keep views across requests (a
re-sync unmaps them).
"""

from __future__ import annotations

import bisect
import mmap
import os
import stat
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from mpqemu_mgmt.errors import DmaError
from mpqemu_mgmt.protocol.messages import SysmemRegion

_PAGE = mmap.PAGESIZE


class RegionKey(NamedTuple):
    """What makes two SYNC_SYSMEM entries the same mapping."""

    gpa: int
    size: int
    offset: int
    dev: int
    ino: int


class _Mapped:
    __slots__ = ("delta", "gpa", "key", "map", "size", "view")

    def __init__(self, key: RegionKey, m: mmap.mmap, delta: int) -> None:
        self.key = key
        self.gpa = key.gpa
        self.size = key.size
        self.map = m
        self.delta = delta
        self.view = memoryview(m)[delta : delta + key.size]

    def close(self) -> bool:
        self.view.release()
        try:
            self.map.close()
        except BufferError:
            return False  # a caller still holds a view; retried at the next re-sync
        return True


class MappedGuestMemory:
    """GuestMemory over the regions of the last SYNC_SYSMEM."""

    def __init__(self, log: Callable[[str], None] | None = None) -> None:
        self._regions: list[_Mapped] = []
        self._starts: list[int] = []
        self._keys: tuple[RegionKey, ...] = ()
        self._zombies: list[_Mapped] = []
        self._log = log or (lambda _m: None)
        self.syncs = 0
        self.remaps = 0

    # -- SYNC_SYSMEM -----------------------------------------------------------------------------

    def sync(self, regions: Sequence[SysmemRegion]) -> bool:
        """Adopt a SYNC_SYSMEM: remap if the map changed. Closes every fd in ``regions``.

        Returns True if the map was replaced. A region that cannot be mapped safely is left out
        (and logged): DMA there then fails cleanly instead of faulting.
        """
        self.syncs += 1
        try:
            keys: list[RegionKey] = []
            for r in regions:
                st = os.fstat(r.fd.fileno())
                keys.append(RegionKey(r.gpa, r.size, r.offset, st.st_dev, st.st_ino))
            if tuple(keys) == self._keys:
                return False
            self._unmap_all()
            mapped: list[_Mapped] = []
            for r, key in zip(regions, keys, strict=True):
                m = self._map_one(r, key)
                if m is not None:
                    mapped.append(m)
            mapped.sort(key=lambda m: m.gpa)
            # Overlapping entries would make a gpa ambiguous: keep the first, drop the rest.
            clean: list[_Mapped] = []
            for m in mapped:
                if clean and m.gpa < clean[-1].gpa + clean[-1].size:
                    self._log(f"SYNC_SYSMEM region at {m.gpa:#x} overlaps another; ignored")
                    m.close()
                    continue
                clean.append(m)
            self._regions = clean
            self._starts = [m.gpa for m in clean]
            self._keys = tuple(keys)
            self.remaps += 1
            return True
        finally:
            for r in regions:
                r.fd.close()

    def _map_one(self, r: SysmemRegion, key: RegionKey) -> _Mapped | None:
        if r.size <= 0 or r.offset < 0 or r.gpa + r.size > 1 << 64:
            self._log(f"SYNC_SYSMEM region {r.gpa:#x}+{r.size:#x} @ {r.offset:#x} is invalid; ignored")
            return None
        fd = r.fd.fileno()
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_size < r.offset + r.size:
            self._log(
                f"SYNC_SYSMEM region {r.gpa:#x}+{r.size:#x} @ {r.offset:#x} runs past the end of "
                f"its file ({st.st_size:#x} bytes); ignored"
            )
            return None
        map_off = r.offset - r.offset % _PAGE
        delta = r.offset - map_off
        try:
            m = mmap.mmap(
                fd,
                r.size + delta,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=map_off,
            )
        except (OSError, ValueError, OverflowError) as exc:
            self._log(f"cannot map SYNC_SYSMEM region {r.gpa:#x}+{r.size:#x}: {exc}")
            return None
        return _Mapped(key, m, delta)

    def _unmap_all(self) -> None:
        self._zombies = [z for z in self._zombies if not z.close()]
        for m in self._regions:
            if not m.close():
                self._zombies.append(m)
        self._regions = []
        self._starts = []
        self._keys = ()

    def close(self) -> None:
        self._unmap_all()

    # -- GuestMemory -----------------------------------------------------------------------------

    def _find(self, gpa: int) -> _Mapped | None:
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i < 0:
            return None
        m = self._regions[i]
        return m if gpa < m.gpa + m.size else None

    def _pieces(self, gpa: int, length: int) -> list[tuple[_Mapped, int, int]]:
        """Split ``[gpa, gpa + length)`` over adjacent regions; DmaError if any byte is unmapped."""
        if length < 0 or gpa < 0:
            raise DmaError("negative DMA address or length", gpa=gpa, length=length)
        out: list[tuple[_Mapped, int, int]] = []
        cur, left = gpa, length
        while left > 0:
            m = self._find(cur)
            if m is None:
                raise DmaError(f"DMA outside guest RAM at {cur:#x}", gpa=gpa, length=length)
            off = cur - m.gpa
            n = min(left, m.size - off)
            out.append((m, off, n))
            cur += n
            left -= n
        return out

    def read(self, gpa: int, length: int) -> bytes:
        pieces = self._pieces(gpa, length)
        if len(pieces) == 1:
            m, off, n = pieces[0]
            return bytes(m.view[off : off + n])
        return b"".join(bytes(m.view[off : off + n]) for m, off, n in pieces)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        src = memoryview(data).cast("B")
        pieces = self._pieces(gpa, len(src))
        pos = 0
        for m, off, n in pieces:
            m.view[off : off + n] = src[pos : pos + n]
            pos += n

    def view(self, gpa: int, length: int) -> memoryview:
        pieces = self._pieces(gpa, length)
        if len(pieces) > 1:
            raise DmaError("DMA view crosses a RAM region boundary", gpa=gpa, length=length)
        if not pieces:
            return memoryview(b"")
        m, off, n = pieces[0]
        return m.view[off : off + n]

    def contains(self, gpa: int, length: int) -> bool:
        try:
            self._pieces(gpa, length)
        except DmaError:
            return False
        return True

    def regions(self) -> list[dict[str, Any]]:
        """JSON-ready map for x-device-status."""
        return [{"gpa": m.gpa, "size": m.size, "offset": m.key.offset} for m in self._regions]
