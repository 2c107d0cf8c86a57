"""The block backend of virtio-blk: the named IO shell of the virtio package.

:class:`BlockBackend` is the protocol the pure request handler uses; :class:`FdBlockBackend`
implements it on an fd the process inherited (``--backing-fd K``). It never opens a file: the
path was opened by the manager before exec, and the confined process only has the number.
Data moves with ``preadv``/``pwritev`` straight between the file and memoryviews of the mapped
guest RAM, with no intermediate copy; FLUSH is ``fdatasync`` (what QEMU's file-posix driver
does for ``bdrv_co_flush`` on a raw file).

Syscalls this module makes (for the seccomp policy): at construction, before the filter is
installed, ``fstat``, ``fcntl(F_GETFL)`` and ``lseek`` (size of a block device); while serving,
``preadv2``/``pwritev2`` (CPython's ``os.preadv``/``os.pwritev`` call the v2 syscalls whenever the
C library has them) and ``fdatasync``.

What it must not do: open, close or resize files, interpret request headers, or copy guest data
into Python objects.
"""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Sequence
from typing import Protocol

from mpqemu_mgmt.devices.virtio.iov import iov_discard_front
from mpqemu_mgmt.errors import DeviceError


class BlockBackend(Protocol):
    """What the virtio-blk request handler needs from its disk."""

    @property
    def size(self) -> int:
        """Bytes; fixed for the life of the device (no resize events)."""
        ...

    @property
    def readonly(self) -> bool: ...

    def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        """Fill ``buffers`` from ``offset``; bytes past the end of the file read as zero."""
        ...

    def writev(self, offset: int, buffers: Sequence[memoryview]) -> None:
        """Write all of ``buffers`` at ``offset``; OSError on failure."""
        ...

    def flush(self) -> None:
        """Make every completed write durable; OSError on failure."""
        ...


class FdBlockBackend:
    """A raw image or block device on an inherited fd."""

    def __init__(self, fd: int, *, readonly: bool = False) -> None:
        try:
            st = os.fstat(fd)
            accmode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        except OSError as exc:
            raise DeviceError(f"backing fd {fd} is not usable: {exc.strerror}", fd=fd) from exc
        if stat.S_ISREG(st.st_mode):
            size = st.st_size
        elif stat.S_ISBLK(st.st_mode):
            size = os.lseek(fd, 0, os.SEEK_END)
        else:
            raise DeviceError(f"backing fd {fd} is neither a regular file nor a block device", fd=fd)
        self._fd = fd
        self._size = size
        # An fd opened O_RDONLY cannot be written whatever the flag says: offer VIRTIO_BLK_F_RO.
        self._readonly = readonly or accmode == os.O_RDONLY

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def size(self) -> int:
        return self._size

    @property
    def readonly(self) -> bool:
        return self._readonly

    def readv(self, offset: int, buffers: Sequence[memoryview]) -> None:
        todo: Sequence[memoryview] = buffers
        while todo:
            n = os.preadv(self._fd, todo, offset)
            if n == 0:
                # End of file (the image shrank under us): the rest reads as zeroes, as
                # file-posix does for short reads (block/file-posix.c raw_co_prw).
                for buf in todo:
                    buf[:] = bytes(buf.nbytes)
                return
            offset += n
            todo = iov_discard_front(todo, n)

    def writev(self, offset: int, buffers: Sequence[memoryview]) -> None:
        if self._readonly:
            raise PermissionError(13, "read-only backing")
        todo: Sequence[memoryview] = buffers
        while todo:
            n = os.pwritev(self._fd, todo, offset)
            if n <= 0:
                raise OSError(28, "short write")
            offset += n
            todo = iov_discard_front(todo, n)

    def flush(self) -> None:
        os.fdatasync(self._fd)
