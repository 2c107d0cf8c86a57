"""The split virtqueue core (mpqemu_mgmt.devices.virtio.ring): layout, chains, used ring, EVENT_IDX.

Pure: guest RAM is a bytearray behind FlatGuestMemory, which raises DmaError on any access
outside it, so "never memory outside guest RAM" is checked by construction.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpqemu_mgmt.devices.virtio.constants import (
    AVAIL_F_NO_INTERRUPT,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
)
from mpqemu_mgmt.devices.virtio.ring import SplitQueue
from mpqemu_mgmt.devices.virtio.vring import SplitRing, legacy_ring_layout, vring_need_event
from mpqemu_mgmt.errors import VirtqueueError
from mpqemu_mgmt.testing.virtio_driver import FlatGuestMemory


def _examples(default: int) -> int:
    """Suite slice by default; ``VIRTIO_FUZZ_EXAMPLES=N`` runs the long campaign."""
    return int(os.environ.get("VIRTIO_FUZZ_EXAMPLES", default))


RAM = 1 << 20
RING = 0x1000
NUM = 16


class Guest:
    """A tiny driver-side view of one ring in a bytearray."""

    def __init__(self, num: int = NUM, event_idx: bool = False, notify_on_empty: bool = False) -> None:
        self.buf = bytearray(RAM)
        self.mem = FlatGuestMemory(self.buf)
        self.q = SplitQueue(num)
        self.q.set_legacy_address(RING)
        self.q.event_idx = event_idx
        self.q.notify_on_empty = notify_on_empty
        self.num = num
        self.avail, self.used, _ = legacy_ring_layout(RING, num)
        self.idx = 0

    def desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        struct.pack_into("<QIHH", self.buf, RING + 16 * i, addr, length, flags, nxt)

    def table(self, at: int, entries: list[tuple[int, int, int, int]]) -> None:
        for i, e in enumerate(entries):
            struct.pack_into("<QIHH", self.buf, at + 16 * i, *e)

    def publish(self, head: int) -> None:
        struct.pack_into("<H", self.buf, self.avail + 4 + 2 * (self.idx % self.num), head)
        self.idx = (self.idx + 1) & 0xFFFF
        struct.pack_into("<H", self.buf, self.avail + 2, self.idx)

    def used_idx(self) -> int:
        return int(struct.unpack_from("<H", self.buf, self.used + 2)[0])

    def used_elem(self, slot: int) -> tuple[int, int]:
        return struct.unpack_from("<II", self.buf, self.used + 4 + 8 * slot)  # type: ignore[return-value]

    def set_used_event(self, value: int) -> None:
        struct.pack_into("<H", self.buf, self.avail + 4 + 2 * self.num, value)

    def avail_event(self) -> int:
        return int(struct.unpack_from("<H", self.buf, self.used + 4 + 8 * self.num)[0])


def test_legacy_layout_matches_virtio_queue_update_rings() -> None:
    # 256 entries: desc 4096 bytes, avail 4+512 (+2) bytes, used on the next page.
    assert legacy_ring_layout(0x10000, 256) == (0x11000, 0x12000, 0x2000 + 4 + 8 * 256 + 2)
    assert legacy_ring_layout(0x10000, 16) == (0x10100, 0x11000, 0x1000 + 4 + 8 * 16 + 2)


def test_split_ring_field_addresses() -> None:
    # The one table of offsets the device and the test driver share, pinned field by field.
    r = SplitRing.legacy(0x10000, 16)
    assert r == SplitRing(0x10000, 0x10100, 0x11000, 16)
    assert (r.desc_entry(0), r.desc_entry(15)) == (0x10000, 0x100F0)
    assert (r.avail_flags, r.avail_idx) == (0x10100, 0x10102)
    assert (r.avail_slot(0), r.avail_slot(15), r.used_event) == (0x10104, 0x10122, 0x10124)
    assert (r.used_flags, r.used_idx) == (0x11000, 0x11002)
    assert (r.used_slot(0), r.used_slot(15)) == (0x11004, 0x1107C)
    assert r.avail_event == 0x11084
    # legacy_ring_layout's total ends right after avail_event
    assert r.desc + legacy_ring_layout(r.desc, r.num)[2] == r.avail_event + 2


@pytest.mark.parametrize(
    ("event", "new", "old", "expected"),
    [(0, 1, 0, True), (1, 1, 0, False), (5, 10, 4, True), (10, 10, 4, False), (0xFFFF, 0, 0xFFFF, True)],
)
def test_vring_need_event(event: int, new: int, old: int, expected: bool) -> None:
    assert vring_need_event(event, new, old) is expected


def test_direct_chain_pop_push() -> None:
    g = Guest()
    g.buf[0x8000:0x8010] = b"H" * 16
    g.desc(3, 0x8000, 16, DESC_F_NEXT, 5)
    g.desc(5, 0x9000, 100, DESC_F_NEXT | DESC_F_WRITE, 7)
    g.desc(7, 0xA000, 1, DESC_F_WRITE)
    g.publish(3)
    with g.q.session(g.mem) as ring:
        chain = ring.pop()
        assert chain is not None
        assert chain.head == 3
        assert [bytes(v) for v in chain.readable] == [b"H" * 16]
        assert [v.nbytes for v in chain.writable] == [100, 1]
        chain.writable[1][0] = 0x42
        assert ring.pop() is None
        ring.push(chain, 101)
    assert g.buf[0xA000] == 0x42
    assert g.used_idx() == 1
    assert g.used_elem(0) == (3, 101)
    assert g.q.inuse == 0


def test_indirect_chain() -> None:
    g = Guest()
    g.table(
        0x7000,
        [
            (0x8000, 16, DESC_F_NEXT, 1),
            (0x9000, 512, DESC_F_NEXT | DESC_F_WRITE, 2),
            (0xA000, 1, DESC_F_WRITE, 0),
        ],
    )
    g.desc(0, 0x7000, 48, DESC_F_INDIRECT)
    g.publish(0)
    with g.q.session(g.mem) as ring:
        chain = ring.pop()
        assert chain is not None
        assert chain.readable_len == 16
        assert chain.writable_len == 513


HOSTILE = [
    ("loop", lambda g: (g.desc(0, 0x8000, 16, DESC_F_NEXT, 1), g.desc(1, 0x8000, 16, DESC_F_NEXT, 0))),
    ("self loop", lambda g: g.desc(0, 0x8000, 16, DESC_F_NEXT, 0)),
    ("next out of table", lambda g: g.desc(0, 0x8000, 16, DESC_F_NEXT, NUM)),
    ("zero length", lambda g: g.desc(0, 0x8000, 0)),
    ("buffer past RAM", lambda g: g.desc(0, RAM - 8, 16)),
    ("buffer at huge address", lambda g: g.desc(0, 1 << 63, 16)),
    ("wrapping buffer", lambda g: g.desc(0, (1 << 64) - 8, 16)),
    ("indirect bad size", lambda g: g.desc(0, 0x7000, 20, DESC_F_INDIRECT)),
    ("indirect zero size", lambda g: g.desc(0, 0x7000, 0, DESC_F_INDIRECT)),
    ("indirect table outside RAM", lambda g: g.desc(0, RAM - 16, 32, DESC_F_INDIRECT)),
    (
        "indirect loop",
        lambda g: (
            g.table(0x7000, [(0x8000, 16, DESC_F_NEXT, 1), (0x8000, 16, DESC_F_NEXT, 0)]),
            g.desc(0, 0x7000, 32, DESC_F_INDIRECT),
        ),
    ),
    (
        "indirect next past table",
        lambda g: (
            g.table(0x7000, [(0x8000, 16, DESC_F_NEXT, 2), (0x8000, 16, 0, 0)]),
            g.desc(0, 0x7000, 32, DESC_F_INDIRECT),
        ),
    ),
    (
        "readable after writable",
        lambda g: (g.desc(0, 0x8000, 16, DESC_F_WRITE | DESC_F_NEXT, 1), g.desc(1, 0x9000, 16)),
    ),
]


@pytest.mark.parametrize(("name", "setup"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_chain_breaks_queue(name: str, setup: object) -> None:
    g = Guest()
    setup(g)  # type: ignore[operator]
    g.publish(0)
    with g.q.session(g.mem) as ring, pytest.raises(VirtqueueError):
        ring.pop()
    assert g.q.broken
    # A broken queue stays quiet until reset.
    with g.q.session(g.mem) as ring:
        assert ring.pop() is None
    assert g.used_idx() == 0


def test_head_out_of_range_and_avail_jump() -> None:
    g = Guest()
    g.publish(NUM)  # head index == queue size
    with g.q.session(g.mem) as ring, pytest.raises(VirtqueueError, match="available"):
        ring.pop()
    g = Guest()
    struct.pack_into("<H", g.buf, g.avail + 2, NUM + 1)  # more heads than the ring holds
    with g.q.session(g.mem) as ring, pytest.raises(VirtqueueError, match="avail index"):
        ring.pop()


def test_ring_outside_ram_is_refused_not_crashed() -> None:
    buf = bytearray(RAM)
    mem = FlatGuestMemory(buf)
    q = SplitQueue(NUM)
    q.set_legacy_address(RAM - 0x1000)  # used ring would fall past the end
    struct.pack_into("<H", buf, RAM - 0x1000 + 16 * NUM + 2, 1)
    with q.session(mem) as ring:
        chain = None
        with pytest.raises(VirtqueueError):
            chain = ring.pop()
            assert chain is not None
            ring.push(chain, 0)


def _serve(g: Guest, n: int) -> bool:
    g.desc(0, 0x8000, 16)
    for _ in range(n):
        g.publish(0)
    with g.q.session(g.mem) as ring:
        while (c := ring.pop()) is not None:
            ring.push(c, 0)
        ring.enable_notification()
        return ring.should_notify()


def test_no_interrupt_flag_without_event_idx() -> None:
    g = Guest()
    assert _serve(g, 1)
    struct.pack_into("<H", g.buf, g.avail, AVAIL_F_NO_INTERRUPT)
    assert not _serve(g, 1)


def test_notify_on_empty_overrides_no_interrupt() -> None:
    g = Guest(notify_on_empty=True)
    struct.pack_into("<H", g.buf, g.avail, AVAIL_F_NO_INTERRUPT)
    assert _serve(g, 1)


def test_event_idx_suppresses_until_used_event() -> None:
    g = Guest(event_idx=True)
    assert _serve(g, 1)  # first signal is always sent (signalled_used not valid yet)
    g.set_used_event(5)  # driver: "interrupt me when used.idx passes 5"
    assert not _serve(g, 2)  # used 1 -> 3
    assert not _serve(g, 2)  # 3 -> 5: event 5 not yet passed (needs new > 5)
    assert _serve(g, 1)  # 5 -> 6 crosses it
    # The device asks to be kicked at the next avail index.
    assert g.avail_event() == g.idx


@settings(max_examples=_examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.lists(st.integers(1, 300), min_size=0, max_size=4),
            st.lists(st.integers(1, 300), min_size=0, max_size=4),
            st.booleans(),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_well_formed_chains_round_trip(chains: list[tuple[list[int], list[int], bool]]) -> None:
    """Any well-formed mix of direct and indirect chains pops back exactly as laid out."""
    g = Guest(num=64)
    cursor = 0x20000
    next_desc = 0
    expected = []
    for reads, writes, indirect in chains:
        if not reads and not writes:
            reads = [1]
        bufs = []
        for n in reads:
            g.buf[cursor : cursor + n] = bytes([n & 0xFF]) * n
            bufs.append((cursor, n, 0))
            cursor += n
        for n in writes:
            bufs.append((cursor, n, DESC_F_WRITE))
            cursor += n
        entries = [
            (a, n, f | (DESC_F_NEXT if i + 1 < len(bufs) else 0), i + 1 if i + 1 < len(bufs) else 0)
            for i, (a, n, f) in enumerate(bufs)
        ]
        if indirect:
            table = cursor
            cursor += 16 * len(entries)
            g.table(table, entries)
            head = next_desc
            g.desc(head, table, 16 * len(entries), DESC_F_INDIRECT)
            next_desc += 1
        else:
            head = next_desc
            for i, (a, n, f, _) in enumerate(entries):
                nxt = next_desc + i + 1 if f & DESC_F_NEXT else 0
                g.desc(next_desc + i, a, n, f, nxt)
            next_desc += len(entries)
        g.publish(head)
        expected.append((head, reads, writes))
    with g.q.session(g.mem) as ring:
        for head, reads, writes in expected:
            c = ring.pop()
            assert c is not None
            assert c.head == head
            assert [bytes(v) for v in c.readable] == [bytes([n & 0xFF]) * n for n in reads]
            assert [v.nbytes for v in c.writable] == writes
            ring.push(c, sum(writes))
        assert ring.pop() is None
    assert g.used_idx() == len(expected)
    assert [g.used_elem(i) for i in range(len(expected))] == [(h, sum(w)) for h, _, w in expected]


@settings(max_examples=_examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    descs=st.lists(
        st.tuples(
            st.one_of(st.integers(0, RAM + 64), st.integers(0, 2**64 - 1)),
            st.one_of(st.integers(0, 4096), st.integers(0, 2**32 - 1)),
            st.integers(0, 0xFFFF),
            st.integers(0, 0xFFFF),
        ),
        min_size=NUM,
        max_size=NUM,
    ),
    heads=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=8),
    avail_idx=st.one_of(st.none(), st.integers(0, 0xFFFF)),
    table=st.binary(min_size=0, max_size=256),
)
def test_garbage_rings_never_crash(
    descs: list[tuple[int, int, int, int]], heads: list[int], avail_idx: int | None, table: bytes
) -> None:
    """Arbitrary descriptor tables and avail rings: a chain, None, or VirtqueueError — nothing else.

    FlatGuestMemory raises DmaError (not caught here) on any access outside RAM, so a pass also
    proves that nothing outside guest RAM was touched.
    """
    g = Guest(event_idx=True, notify_on_empty=True)
    g.buf[0x7000 : 0x7000 + len(table)] = table
    for i, d in enumerate(descs):
        g.desc(i, *d)
    for h in heads:
        g.publish(h)
    if avail_idx is not None:
        struct.pack_into("<H", g.buf, g.avail + 2, avail_idx)
    with g.q.session(g.mem) as ring:
        try:
            while (c := ring.pop()) is not None:
                for v in c.writable:
                    v[:] = b"\xaa" * v.nbytes
                ring.push(c, c.writable_len)
            ring.enable_notification()
            ring.should_notify()
        except VirtqueueError:
            assert g.q.broken


@pytest.mark.parametrize("start", [0, 13, 0xFFFE])
def test_push_many_is_push_one_by_one_with_one_used_idx_store(start: int) -> None:
    """push_many (virtqueue_fill x n + virtqueue_flush(n)) leaves RAM and queue as n pushes do,
    across the ring's wrap and the 16-bit index wrap, with or without the signalled index."""
    guests = [Guest(event_idx=True), Guest(event_idx=True)]
    for g in guests:
        g.q.last_avail_idx = g.q.used_idx = g.idx = start
        g.q.signalled_used, g.q.signalled_used_valid = (start + 2) & 0xFFFF, True
        struct.pack_into("<H", g.buf, g.used + 2, start)
        for i in range(5):
            g.desc(i, 0x20000 + 0x100 * i, 0x100, DESC_F_WRITE)
            g.publish(i)
    states = []
    for k, g in enumerate(guests):
        with g.q.session(g.mem) as ring:
            chains = [c for c in iter(ring.pop, None)]
            lens = [0x100 - i for i in range(len(chains))]
            if k == 0:
                for c, n in zip(chains[:4], lens[:4], strict=True):
                    ring.push(c, n)
            else:
                ring.push_many(chains, lens[:4])  # only as many as there are lengths
            states.append(
                (bytes(g.buf), g.q.used_idx, g.q.inuse, g.q.signalled_used_valid, ring.should_notify())
            )
    assert states[0] == states[1]
    assert guests[1].used_idx() == (start + 4) & 0xFFFF and guests[1].q.inuse == 1
    assert [guests[1].used_elem((start + i) % NUM) for i in range(4)] == [(i, 0x100 - i) for i in range(4)]
