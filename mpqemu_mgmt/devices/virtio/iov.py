"""Scatter-list arithmetic shared by the virtio-blk request handler and its block backend.

A request's data is a list of memoryviews of guest RAM (QEMU's ``struct iovec`` arrays). Both
the pure handler (:mod:`mpqemu_mgmt.devices.virtio_blk`, skipping the request header) and the
backend (:mod:`mpqemu_mgmt.devices.virtio.blockio`, resuming after a short ``preadv``/``pwritev``)
need the same "everything after the first N bytes" step; it is defined here once.

Pure: it slices views and never copies, reads or writes the bytes behind them, and does no IO.
"""

from __future__ import annotations

from collections.abc import Iterable


def iov_discard_front(views: Iterable[memoryview], skip: int) -> list[memoryview]:
    """``views`` without their first ``skip`` bytes, as zero-copy slices.

    Mirrors ``iov_discard_front`` (util/iov.c), except that it returns a new list instead of
    editing the caller's array: views wholly inside the skipped bytes are dropped, the first
    one that is not is sliced, the rest are kept as they are.
    """
    out: list[memoryview] = []
    for v in views:
        n = v.nbytes
        if skip >= n:
            skip -= n
            continue
        out.append(v[skip:] if skip else v)
        skip = 0
    return out
