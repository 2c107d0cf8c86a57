"""Guest memory for a vfio-user device: the client's DMA windows, mmapped or reached by message.

The client names the memory a device may reach with DMA_MAP windows (vfio-user.rst
"VFIO_USER_DMA_MAP"). A window that came with an fd is mmapped MAP_SHARED at the given file offset
and accessed in place; a window without one is reached through DMA_READ/DMA_WRITE messages (the
"fallback when memory is not shared"), for which the host injects two callables. Every access is
bounds-checked against the windows and their read/write flags: nothing outside what the client
mapped is ever touched (:class:`~mpqemu_mgmt.errors.DmaError` otherwise). An access may span
adjacent windows (QEMU maps guest RAM in several sections); ``view`` (zero copy) needs one mmapped
window.

This is an IO shell module (mmap); it must not read the socket itself.
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass

from mpqemu_mgmt.errors import DmaError, InvalidMessage
from mpqemu_mgmt.protocol.vfio_user import wire

RemoteRead = Callable[[int, int], bytes]
RemoteWrite = Callable[[int, bytes], None]


@dataclass
class _Window:
    address: int
    size: int
    readable: bool
    writable: bool
    mm: mmap.mmap | None

    @property
    def end(self) -> int:
        return self.address + self.size


def _no_remote_read(gpa: int, length: int) -> bytes:
    raise DmaError("DMA by message is not available", gpa=gpa, length=length)


def _no_remote_write(gpa: int, data: bytes) -> None:
    raise DmaError("DMA by message is not available", gpa=gpa, length=len(data))


def _release(window: _Window) -> None:
    if window.mm is not None:
        # A model may still hold a zero-copy view; then the mapping goes when that view does.
        with contextlib.suppress(BufferError):
            window.mm.close()
        window.mm = None


class DmaWindows:
    """The DMA map table and a GuestMemory over it (devices/base.py ``GuestMemory``)."""

    def __init__(
        self,
        max_windows: int = 64,
        remote_read: RemoteRead = _no_remote_read,
        remote_write: RemoteWrite = _no_remote_write,
        chunk: int = wire.DEFAULT_MAX_DATA_XFER,
    ) -> None:
        self.max_windows = max_windows
        self.remote_read = remote_read
        self.remote_write = remote_write
        self.chunk = chunk
        self._windows: list[_Window] = []  # sorted by address, never overlapping
        self._starts: list[int] = []

    # -- the map table ----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._windows)

    def windows(self) -> list[tuple[int, int, bool]]:
        """(address, size, mmapped) of every window, for status and tests."""
        return [(w.address, w.size, w.mm is not None) for w in self._windows]

    def map(self, address: int, size: int, flags: int, offset: int, fd: int | None) -> None:
        """Add a window. Takes ownership of ``fd`` (closed here on every path).

        Raises InvalidMessage with errno EEXIST for an overlap (vfio-user.rst: "A command to map
        over an existing region must be failed by the server with EEXIST"), ENOSPC past the
        window limit, EINVAL when the fd cannot be mapped as asked.
        """
        try:
            i = bisect.bisect_right(self._starts, address)
            if i > 0 and self._windows[i - 1].end > address:
                raise InvalidMessage("DMA window overlaps", errno=wire.EEXIST, address=address)
            if i < len(self._windows) and self._windows[i].address < address + size:
                raise InvalidMessage("DMA window overlaps", errno=wire.EEXIST, address=address)
            if len(self._windows) >= self.max_windows:
                raise InvalidMessage("too many DMA windows", errno=wire.ENOSPC)
            mm = None
            if fd is not None:
                prot = (mmap.PROT_READ if flags & wire.DMA_FLAG_READ else 0) | (
                    mmap.PROT_WRITE if flags & wire.DMA_FLAG_WRITE else 0
                )
                if offset % mmap.ALLOCATIONGRANULARITY:
                    raise InvalidMessage("DMA fd offset not page aligned", errno=wire.EINVAL)
                try:
                    mm = mmap.mmap(fd, size, mmap.MAP_SHARED, prot or mmap.PROT_READ, offset=offset)
                except (OSError, ValueError, OverflowError) as exc:
                    raise InvalidMessage(f"cannot map DMA fd: {exc}", errno=wire.EINVAL) from exc
            window = _Window(
                address, size, bool(flags & wire.DMA_FLAG_READ), bool(flags & wire.DMA_FLAG_WRITE), mm
            )
            self._windows.insert(i, window)
            self._starts.insert(i, address)
        finally:
            if fd is not None:
                os.close(fd)  # the mapping holds its own reference

    def unmap(self, address: int, size: int) -> None:
        """Drop the window that matches exactly (vfio-user.rst); ENOENT when there is none."""
        i = bisect.bisect_left(self._starts, address)
        if i >= len(self._windows) or self._windows[i].address != address or self._windows[i].size != size:
            raise InvalidMessage("no DMA window matches", errno=wire.ENOENT, address=address, size=size)
        window = self._windows.pop(i)
        self._starts.pop(i)
        _release(window)

    def clear(self) -> None:
        """Unmap everything (client disconnect: vfio-user.rst "Client Disconnection")."""
        for window in self._windows:
            _release(window)
        self._windows.clear()
        self._starts.clear()

    # -- GuestMemory -----------------------------------------------------------------------

    def _pieces(self, gpa: int, length: int, write: bool) -> list[tuple[_Window, int, int]]:
        """(window, offset in window, length) pieces covering [gpa, gpa+length) exactly."""
        if gpa < 0 or length < 0:
            raise DmaError("negative DMA address or length", gpa=gpa, length=length)
        pieces: list[tuple[_Window, int, int]] = []
        pos, left = gpa, length
        i = bisect.bisect_right(self._starts, gpa) - 1
        while left > 0:
            if i < 0 or i >= len(self._windows):
                raise DmaError("DMA outside the client's windows", gpa=gpa, length=length)
            w = self._windows[i]
            if not (w.address <= pos < w.end):
                raise DmaError("DMA outside the client's windows", gpa=gpa, length=length)
            if (write and not w.writable) or (not write and not w.readable):
                raise DmaError("DMA not permitted by the window's flags", gpa=gpa, write=write)
            n = min(left, w.end - pos)
            pieces.append((w, pos - w.address, n))
            pos += n
            left -= n
            i += 1
        return pieces

    def read(self, gpa: int, length: int) -> bytes:
        out = bytearray()
        for w, off, n in self._pieces(gpa, length, write=False):
            if w.mm is not None:
                out += w.mm[off : off + n]
            else:
                for start in range(0, n, self.chunk):
                    k = min(self.chunk, n - start)
                    data = self.remote_read(w.address + off + start, k)
                    if len(data) != k:
                        raise DmaError("short DMA_READ reply", gpa=w.address + off + start, length=k)
                    out += data
        return bytes(out)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        src = memoryview(data).cast("B")
        done = 0
        for w, off, n in self._pieces(gpa, len(src), write=True):
            if w.mm is not None:
                w.mm[off : off + n] = src[done : done + n]
            else:
                for start in range(0, n, self.chunk):
                    k = min(self.chunk, n - start)
                    self.remote_write(w.address + off + start, bytes(src[done + start : done + start + k]))
            done += n

    def view(self, gpa: int, length: int) -> memoryview:
        pieces = self._pieces(gpa, length, write=False)
        if len(pieces) != 1 or pieces[0][0].mm is None:
            raise DmaError("no single shared window for a zero-copy view", gpa=gpa, length=length)
        w, off, n = pieces[0]
        assert w.mm is not None
        if not w.writable:
            raise DmaError("zero-copy view of a read-only window", gpa=gpa)
        return memoryview(w.mm)[off : off + n]
