"""``ClosedOnExit``: the one ``with owner:`` → ``owner.close()`` mixin for every resource owner.

Owned fds and fd bundles (protocol/fds.py), a virtqueue session's guest-RAM views
(devices/virtio/ring.py), ProxySim's socket and the test harness's child processes
(testing/logged_process.py) all close what they still own on the way out of a
``with`` block, whatever happened inside. Pure: imports nothing but typing helpers, so the
sans-IO codec and the pure device models may use it.
"""

from __future__ import annotations

import abc
from types import TracebackType
from typing import Self


class ClosedOnExit(abc.ABC):
    """``with owner:`` closes what ``owner`` still owns on the way out, whatever happened inside."""

    __slots__ = ()

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
