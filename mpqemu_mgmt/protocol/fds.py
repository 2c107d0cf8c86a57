"""Owning wrappers for file descriptors that travel as SCM_RIGHTS with mpqemu messages.

Every fd a peer sends us is a resource we must either close or adopt on every path, including
error paths (QEMU closes received fds when mpqemu_msg_recv fails; crosvm keeps explicit keep-fds
lists). :class:`OwnedFd` closes its fd when closed explicitly, when garbage-collected or at
interpreter exit, unless ownership was handed on with :meth:`OwnedFd.detach`. :class:`FdBundle` is
an ordered group of them with the same all-or-nothing discipline.

This module must not import ``os``, ``socket`` or ``asyncio``: the function that really closes a
descriptor is injected by whoever creates the wrapper (the transport passes ``os.close``).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import overload

from mpqemu_mgmt.closing import ClosedOnExit
from mpqemu_mgmt.errors import ProtocolError

Closer = Callable[[int], None]


def _close_quietly(close: Closer, fd: int) -> None:
    # Runs from weakref.finalize (GC or interpreter exit): an fd already gone is not an error.
    with contextlib.suppress(OSError):
        close(fd)


class OwnedFd(ClosedOnExit):
    """One file descriptor that this object owns until :meth:`close` or :meth:`detach`."""

    __slots__ = ("__weakref__", "_close", "_fd", "_finalizer")

    def __init__(self, fd: int, close: Closer) -> None:
        if fd < 0:
            raise ProtocolError("negative file descriptor", fd=fd)
        self._fd: int | None = fd
        self._close = close
        self._finalizer = weakref.finalize(self, _close_quietly, close, fd)

    @property
    def closed(self) -> bool:
        return self._fd is None

    def fileno(self) -> int:
        """Borrow the number; the wrapper still owns it."""
        if self._fd is None:
            raise ProtocolError("file descriptor already closed or detached")
        return self._fd

    def detach(self) -> int:
        """Hand ownership to the caller, who must close the returned number."""
        fd = self.fileno()
        self._finalizer.detach()
        self._fd = None
        return fd

    def close(self) -> None:
        """Close now; closing twice is a no-op."""
        if self._fd is not None:
            self._fd = None
            self._finalizer()


    def __repr__(self) -> str:
        return f"OwnedFd({self._fd if self._fd is not None else 'closed'})"


class FdBundle(ClosedOnExit, Sequence[OwnedFd]):
    """An ordered, immutable group of :class:`OwnedFd`; closes whatever was not adopted."""

    __slots__ = ("_fds",)

    def __init__(self, fds: Iterable[OwnedFd] = ()) -> None:
        self._fds: tuple[OwnedFd, ...] = tuple(fds)

    @classmethod
    def adopt(cls, numbers: Iterable[int], close: Closer) -> FdBundle:
        """Wrap raw numbers; if wrapping one fails, the ones not yet wrapped are closed too."""
        nums = list(numbers)
        wrapped: list[OwnedFd] = []
        try:
            for n in nums:
                wrapped.append(OwnedFd(n, close))
        except BaseException:
            for owned in wrapped:
                owned.close()
            for n in nums[len(wrapped) :]:
                if n >= 0:
                    _close_quietly(close, n)
            raise
        return cls(wrapped)

    def __len__(self) -> int:
        return len(self._fds)

    @overload
    def __getitem__(self, index: int) -> OwnedFd: ...

    @overload
    def __getitem__(self, index: slice) -> FdBundle: ...

    def __getitem__(self, index: int | slice) -> OwnedFd | FdBundle:
        if isinstance(index, slice):
            return FdBundle(self._fds[index])
        return self._fds[index]

    def __iter__(self) -> Iterator[OwnedFd]:
        return iter(self._fds)

    def numbers(self) -> tuple[int, ...]:
        """Borrowed numbers, in order (for sendmsg)."""
        return tuple(f.fileno() for f in self._fds)

    def close(self) -> None:
        for owned in self._fds:
            owned.close()

    def detach_all(self) -> tuple[int, ...]:
        return tuple(f.detach() for f in self._fds)


    def __repr__(self) -> str:
        return f"FdBundle({list(self._fds)!r})"
