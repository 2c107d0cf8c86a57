"""A pure newc ("070701") cpio writer and reader, enough for a Linux initramfs.

The format is the one the kernel unpacks in ``init/initramfs.c`` and documents in
``Documentation/driver-api/early-userspace/buffer-format.rst``: a 110-byte ASCII header of
"070701" plus thirteen 8-digit hex fields, the NUL-terminated name padded so that the data starts on
a 4-byte boundary, the data padded to 4 bytes, and a final entry named ``TRAILER!!!``.

Pure: bytes in, bytes out. It must not touch the filesystem or spawn a cpio binary; the reader
exists so that tests (and debugging) can check what the writer produced.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from mpqemu_mgmt.errors import GuestKitError

MAGIC = b"070701"
HEADER_SIZE = 110  # 6 magic + 13 fields x 8 hex digits
TRAILER = "TRAILER!!!"
_FIELDS = (
    "ino", "mode", "uid", "gid", "nlink", "mtime", "filesize",
    "devmajor", "devminor", "rdevmajor", "rdevminor", "namesize", "check",
)


def _pad4(n: int) -> int:
    """Bytes of padding that bring ``n`` up to a multiple of 4."""
    return (-n) % 4


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. ``mode`` carries the file type bits (``stat.S_IFREG`` …)."""

    name: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    rdevmajor: int = 0
    rdevminor: int = 0

    @classmethod
    def file(cls, name: str, data: bytes, perm: int = 0o644) -> CpioEntry:
        return cls(name, stat.S_IFREG | perm, data)

    @classmethod
    def directory(cls, name: str, perm: int = 0o755) -> CpioEntry:
        return cls(name, stat.S_IFDIR | perm)

    @classmethod
    def symlink(cls, name: str, target: str) -> CpioEntry:
        # newc stores a symlink's target as its data (init/initramfs.c do_symlink).
        return cls(name, stat.S_IFLNK | 0o777, target.encode())

    @classmethod
    def chardev(cls, name: str, major: int, minor: int, perm: int = 0o600) -> CpioEntry:
        return cls(name, stat.S_IFCHR | perm, rdevmajor=major, rdevminor=minor)


def _header(entry: CpioEntry, ino: int, name: bytes) -> bytes:
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    values = (
        ino, entry.mode, entry.uid, entry.gid, nlink, entry.mtime, len(entry.data),
        0, 0, entry.rdevmajor, entry.rdevminor, len(name) + 1, 0,
    )
    for field, value in zip(_FIELDS, values, strict=True):
        if not 0 <= value <= 0xFFFFFFFF:
            raise GuestKitError(f"cpio field {field}={value} does not fit 32 bits", entry=entry.name)
    return MAGIC + b"".join(b"%08X" % v for v in values)


def _member(entry: CpioEntry, ino: int) -> bytes:
    name = entry.name.encode()
    if not name or b"\0" in name:
        raise GuestKitError("cpio member names must be non-empty and contain no NUL", entry=entry.name)
    head = _header(entry, ino, name) + name + b"\0"
    return head + b"\0" * _pad4(len(head)) + entry.data + b"\0" * _pad4(len(entry.data))


def write_newc(entries: Iterable[CpioEntry]) -> bytes:
    """Serialise ``entries`` in order and append the trailer.

    Parents must come before children (the kernel creates paths as it meets them, it does not make
    missing parent directories). Inode numbers are assigned 1, 2, … so no two members are taken for
    hard links of each other.
    """
    parts: list[bytes] = []
    ino = 0
    for ino, entry in enumerate(entries, start=1):  # ino is reused for the trailer
        if entry.name == TRAILER:
            raise GuestKitError("a member may not be named like the trailer", entry=entry.name)
        parts.append(_member(entry, ino))
    parts.append(_member(CpioEntry(TRAILER, 0), ino + 1))
    return b"".join(parts)


def read_newc(blob: bytes) -> Iterator[CpioEntry]:
    """Parse a newc archive written by :func:`write_newc` (or any newc without hard links).

    Stops at the trailer; raises :class:`GuestKitError` on a bad magic, a truncated member or a
    missing trailer.
    """
    pos = 0
    while True:
        if pos + HEADER_SIZE > len(blob):
            raise GuestKitError("cpio archive truncated (no trailer)", offset=pos)
        if blob[pos:pos + 6] != MAGIC:
            raise GuestKitError("bad cpio magic", offset=pos, magic=blob[pos:pos + 6].hex())
        raw = blob[pos + 6:pos + HEADER_SIZE]
        try:
            fields = dict(zip(_FIELDS, (int(raw[i:i + 8], 16) for i in range(0, 104, 8)), strict=True))
        except ValueError as exc:
            raise GuestKitError("bad cpio header digits", offset=pos) from exc
        name_end = pos + HEADER_SIZE + fields["namesize"]
        data_start = name_end + _pad4(HEADER_SIZE + fields["namesize"])
        data_end = data_start + fields["filesize"]
        if fields["namesize"] == 0 or data_end > len(blob):
            raise GuestKitError("cpio member truncated", offset=pos)
        name = blob[pos + HEADER_SIZE:name_end - 1].decode()
        if name == TRAILER:
            return
        yield CpioEntry(
            name=name,
            mode=fields["mode"],
            data=blob[data_start:data_end],
            uid=fields["uid"],
            gid=fields["gid"],
            mtime=fields["mtime"],
            rdevmajor=fields["rdevmajor"],
            rdevminor=fields["rdevminor"],
        )
        pos = data_end + _pad4(fields["filesize"])
