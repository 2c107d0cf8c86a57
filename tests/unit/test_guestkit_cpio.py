"""The pure newc writer/reader: round trips, alignment, the trailer, refusals."""

from __future__ import annotations

import stat

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpqemu_mgmt.errors import GuestKitError
from mpqemu_mgmt.guestkit.cpio import HEADER_SIZE, MAGIC, TRAILER, CpioEntry, read_newc, write_newc

names = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=0x24F, blacklist_characters="\0"),
                min_size=1, max_size=40).filter(lambda n: n != TRAILER)
entries = st.one_of(
    st.builds(CpioEntry.file, names, st.binary(max_size=300), st.sampled_from([0o644, 0o755, 0o600])),
    st.builds(CpioEntry.directory, names),
    st.builds(CpioEntry.symlink, names, names),
    st.builds(CpioEntry.chardev, names, st.integers(0, 255), st.integers(0, 255)),
)


def _offsets(blob: bytes) -> list[int]:
    """Start offset of every member (including the trailer), walking the headers."""
    pos, found = 0, []
    while True:
        found.append(pos)
        namesize = int(blob[pos + 94:pos + 102], 16)
        filesize = int(blob[pos + 54:pos + 62], 16)
        name = blob[pos + HEADER_SIZE:pos + HEADER_SIZE + namesize - 1]
        data = pos + HEADER_SIZE + namesize
        data += (-data) % 4
        pos = data + filesize + (-(data + filesize)) % 4
        if name == TRAILER.encode():
            assert pos == len(blob)
            return found


@given(st.lists(entries, max_size=12))
def test_round_trip(members: list[CpioEntry]) -> None:
    blob = write_newc(members)
    assert list(read_newc(blob)) == members


@given(st.lists(entries, max_size=12))
def test_every_member_and_its_data_are_4_byte_aligned(members: list[CpioEntry]) -> None:
    blob = write_newc(members)
    assert len(blob) % 4 == 0
    offsets = _offsets(blob)
    assert len(offsets) == len(members) + 1
    for pos in offsets:
        assert pos % 4 == 0
        assert blob[pos:pos + 6] == MAGIC


def test_header_fields_of_a_known_member() -> None:
    blob = write_newc([CpioEntry.chardev("dev/console", 5, 1)])
    header = blob[:HEADER_SIZE].decode()
    fields = [int(header[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
    ino, mode, uid, gid, nlink, mtime, size, _maj, _min, rmaj, rmin, namesize, check = fields
    assert (ino, uid, gid, nlink, mtime, size, check) == (1, 0, 0, 1, 0, 0, 0)
    assert stat.S_ISCHR(mode) and mode & 0o777 == 0o600
    assert (rmaj, rmin) == (5, 1)
    assert namesize == len("dev/console") + 1
    assert blob[HEADER_SIZE:HEADER_SIZE + namesize] == b"dev/console\0"


def test_directory_has_two_links_and_symlink_stores_target() -> None:
    blob = write_newc([CpioEntry.directory("bin"), CpioEntry.symlink("bin/sh", "/bin/busybox")])
    first, second = read_newc(blob)
    assert int(blob[6 + 8 * 4:6 + 8 * 5], 16) == 2
    assert stat.S_ISDIR(first.mode)
    assert stat.S_ISLNK(second.mode) and second.data == b"/bin/busybox"


def test_empty_archive_is_just_the_trailer() -> None:
    blob = write_newc([])
    assert list(read_newc(blob)) == []
    assert TRAILER.encode() in blob


@pytest.mark.parametrize("name", ["", "a\0b", TRAILER])
def test_bad_names_refused(name: str) -> None:
    with pytest.raises(GuestKitError):
        write_newc([CpioEntry.file(name, b"x")])


def test_reader_refuses_garbage_and_truncation() -> None:
    blob = write_newc([CpioEntry.file("init", b"#!/bin/sh\n")])
    with pytest.raises(GuestKitError, match="magic"):
        list(read_newc(b"070702" + blob[6:]))
    with pytest.raises(GuestKitError):
        list(read_newc(blob[:-HEADER_SIZE]))  # trailer cut off
    with pytest.raises(GuestKitError):
        list(read_newc(blob[:HEADER_SIZE + 3]))  # data cut off
