"""iov_discard_front (mpqemu_mgmt.devices.virtio.iov): the header skip and the short-I/O resume.

Pure: the views are over bytearrays. The property is the definition — the remaining views hold
exactly the bytes after the first ``skip`` — plus zero copies and no empty views left in front.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpqemu_mgmt.devices.virtio.iov import iov_discard_front


def _views(sizes: list[int]) -> tuple[bytearray, list[memoryview]]:
    buf = bytearray(i % 251 for i in range(sum(sizes)))
    mv = memoryview(buf)
    out, pos = [], 0
    for n in sizes:
        out.append(mv[pos : pos + n])
        pos += n
    return buf, out


@pytest.mark.parametrize(
    ("sizes", "skip", "left"),
    [
        ([16, 512, 1], 16, [512, 1]),  # the virtio-blk header in its own buffer
        ([528, 1], 16, [512, 1]),  # header and data in one buffer: sliced
        ([16, 512], 0, [16, 512]),
        ([16, 512], 528, []),
        ([16, 512], 600, []),
        ([8, 8, 8], 12, [4, 8]),
        ([0, 4], 0, [4]),  # a zero-length view is never left in front (skip >= 0 drops it)
    ],
)
def test_table(sizes: list[int], skip: int, left: list[int]) -> None:
    _, views = _views(sizes)
    assert [v.nbytes for v in iov_discard_front(views, skip)] == left


@given(st.lists(st.integers(0, 64), max_size=8), st.integers(0, 600))
def test_rest_is_the_bytes_after_skip_without_copies(sizes: list[int], skip: int) -> None:
    buf, views = _views(sizes)
    rest = iov_discard_front(views, skip)
    assert b"".join(bytes(v) for v in rest) == bytes(buf[skip:])
    assert all(v.nbytes > 0 for v in rest[:1])
    # zero-copy: writing through the result writes the original buffer
    if rest:
        rest[0][0] = 0xAA ^ buf[skip]
        assert buf[skip] == rest[0][0]
