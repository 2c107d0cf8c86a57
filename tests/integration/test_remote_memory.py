"""MappedGuestMemory over real memfds: mapping rules, bounds, re-sync, and the fds it must close."""

from __future__ import annotations

import os

import pytest

from mpqemu_mgmt.errors import DmaError
from mpqemu_mgmt.protocol import OwnedFd, SysmemRegion
from mpqemu_mgmt.remote.memory import MappedGuestMemory

PAGE = os.sysconf("SC_PAGE_SIZE")


def memfd(size: int) -> int:
    fd = os.memfd_create("guest-ram-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def region(fd: int, gpa: int, size: int, offset: int = 0) -> SysmemRegion:
    """A region owning a duplicate of ``fd`` (what SCM_RIGHTS delivers)."""
    return SysmemRegion(gpa, size, offset, OwnedFd(os.dup(fd), os.close))


def fd_closed(r: SysmemRegion) -> bool:
    return r.fd.closed


@pytest.fixture
def ram() -> tuple[int, MappedGuestMemory]:
    fd = memfd(0x300000)
    mem = MappedGuestMemory()
    yield fd, mem  # type: ignore[misc]
    mem.close()
    os.close(fd)


def test_regions_map_at_their_offsets_and_adjacent_ones_join(ram: tuple[int, MappedGuestMemory]) -> None:
    fd, mem = ram
    regs = [region(fd, 0, 0x100000), region(fd, 0x100000, 0x100000, 0x100000)]
    assert mem.sync(regs)
    assert all(fd_closed(r) for r in regs)  # mapped, then the received fds are closed
    os.pwrite(fd, b"abcd", 0xFFFFE)
    assert mem.read(0xFFFFE, 4) == b"abcd"  # crosses from one region into the next
    mem.write(0x1FFFFC, b"WXYZ")
    assert os.pread(fd, 4, 0x1FFFFC) == b"WXYZ"
    with pytest.raises(DmaError):
        mem.view(0xFFFFE, 4)  # a view may not span regions
    assert bytes(mem.view(0x10, 4)) == bytes(4)
    with pytest.raises(DmaError):
        mem.read(0x1FFFFE, 4)  # runs past the end of RAM
    with pytest.raises(DmaError):
        mem.write(-1, b"x")
    assert mem.read(0x500000, 0) == b""  # an empty transfer touches nothing


def test_unaligned_offset_and_holes(ram: tuple[int, MappedGuestMemory]) -> None:
    fd, mem = ram
    os.pwrite(fd, b"hello", PAGE + 0x123)
    mem.sync([region(fd, 0x1000, 0x2000, PAGE + 0x123), region(fd, 0x10000, 0x1000)])
    assert mem.read(0x1000, 5) == b"hello"
    assert not mem.contains(0x3000, 1) and mem.contains(0x2FFF, 1)
    with pytest.raises(DmaError):
        mem.write(0x2FF0, b"x" * 0x20)  # into the hole after the first region
    assert os.pread(fd, 0x20, PAGE + 0x123 + 0x1FF0) == bytes(0x20)  # nothing was written


def test_resync_skips_identical_maps_and_replaces_others(ram: tuple[int, MappedGuestMemory]) -> None:
    fd, mem = ram
    assert mem.sync([region(fd, 0, 0x100000)])
    again = [region(fd, 0, 0x100000)]
    assert not mem.sync(again) and fd_closed(again[0])
    assert (mem.syncs, mem.remaps) == (2, 1)
    other = memfd(0x1000)
    try:
        assert mem.sync([region(other, 0, 0x1000)])
        with pytest.raises(DmaError):
            mem.read(0x2000, 1)
        mem.write(0, b"new")
        assert os.pread(other, 3, 0) == b"new" and os.pread(fd, 3, 0) == bytes(3)
    finally:
        os.close(other)


def test_unsafe_regions_are_left_out(ram: tuple[int, MappedGuestMemory]) -> None:
    fd, mem = ram
    logs: list[str] = []
    mem = MappedGuestMemory(logs.append)
    r_fd, w_fd = os.pipe()
    try:
        regs = [
            region(fd, 0, 0x400000),  # more than the memfd holds: would SIGBUS on access
            region(fd, 0x1000000, 0),  # empty
            SysmemRegion(0x2000000, 0x1000, 0, OwnedFd(os.dup(r_fd), os.close)),  # not mappable
            region(fd, 0x3000000, 0x2000),
            region(fd, 0x3001000, 0x2000),  # overlaps the previous one
        ]
        mem.sync(regs)
        assert all(fd_closed(r) for r in regs)
        assert mem.regions() == [{"gpa": 0x3000000, "size": 0x2000, "offset": 0}]
        assert len(logs) == 4
        with pytest.raises(DmaError):
            mem.read(0, 1)
    finally:
        mem.close()
        os.close(r_fd)
        os.close(w_fd)


def test_a_held_view_does_not_break_a_resync(ram: tuple[int, MappedGuestMemory]) -> None:
    fd, mem = ram
    mem.sync([region(fd, 0, 0x1000)])
    held = mem.view(0, 16)
    mem.sync([region(fd, 0, 0x2000)])  # the old mapping cannot close while the view lives
    mem.write(0x1800, b"ok")
    assert os.pread(fd, 2, 0x1800) == b"ok"
    held.release()
    mem.sync([region(fd, 0, 0x3000)])  # the leftover mapping is closed at the next re-sync
