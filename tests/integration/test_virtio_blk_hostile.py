"""Hostile guests against the real remote process (seccomp enforced), through ProxySim.

Random descriptor chains, headers and ring indices are thrown at ``python -m mpqemu_mgmt.remote
--device virtio-blk``; guest RAM is a 4 MiB memfd, and descriptors point anywhere in the 64-bit
space. After each case the process must still be alive and answering, the request either
completed with a status byte or the device set NEEDS_RESET, and nothing outside the memfd was
touched (GuestMemory refuses it; a wild access would have crashed the process). A reset always
brings the device back. ``VIRTIO_HOSTILE_CASES=N`` runs a longer campaign (the suite runs 60).
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpqemu_mgmt.devices.virtio.constants import (
    BLK_S_OK,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    Status,
)
from mpqemu_mgmt.testing.virtio_blk_remotes import Attached, BuiltinBlkRemote, attach, builtin_blk

RAM = 4 << 20
IMAGE = 1 << 20
CASES = int(os.environ.get("VIRTIO_HOSTILE_CASES", "60"))


@pytest.fixture
def ours(tmp_path: Path) -> Iterator[tuple[BuiltinBlkRemote, Attached, Path]]:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\xee" * IMAGE)
    with (
        builtin_blk(image, workdir=tmp_path, seccomp="enforce") as (remote, sock),
        attach(sock, ram_size=RAM) as att,
    ):
        yield remote, att, image


def _addr(rnd: random.Random, base: int) -> int:
    return rnd.choice(
        [
            base + rnd.randrange(0, 0x10000),
            rnd.randrange(0, RAM + 0x1000),
            RAM - rnd.randrange(0, 64),
            rnd.randrange(0, 2**64),
            2**64 - rnd.randrange(1, 4096),
            0,
        ]
    )


def test_random_hostile_chains_never_crash_the_remote(ours: tuple[BuiltinBlkRemote, Attached, Path]) -> None:
    remote, att, image = ours
    drv = att.driver
    rnd = random.Random(1234)
    broke = completed = 0
    for case in range(CASES):
        drv.init()
        base = drv.ram.alloc(0x10000, align=4096)
        # a plausible header most of the time, garbage otherwise
        rtype = rnd.choice([0, 1, 4, 8, 2, 99, rnd.randrange(2**32)])
        sector = rnd.choice([0, 1, IMAGE // 512 - 1, IMAGE // 512, rnd.randrange(2**64)])
        drv.ram.write(base, struct.pack("<IIQ", rtype, 0, sector))
        # Start from a well-formed chain (header, data, status) and break 0..2 things in it.
        chain = [[base, 16, 0, 1], [base + 0x1000, 512, DESC_F_WRITE, 2], [base + 0x2000, 1, DESC_F_WRITE, 0]]
        if rtype & 1:
            chain[1][2] = 0
        for _ in range(rnd.choice([0, 1, 1, 2])):
            d = rnd.choice(chain)
            field = rnd.randrange(4)
            if field == 0:
                d[0] = _addr(rnd, base)
            elif field == 1:
                d[1] = rnd.choice([0, 1, 15, 511, 4096, rnd.randrange(2**32)])
            elif field == 2:
                d[2] = rnd.choice([DESC_F_WRITE, 0, DESC_F_INDIRECT, rnd.randrange(8)])
            else:
                d[3] = rnd.choice([0, 1, 2, 5, 255, 256, rnd.randrange(2**16)])
        for i, (addr, length, flags, nxt) in enumerate(chain):
            more = i + 1 < len(chain)
            drv.put_desc(i, addr, length, flags & ~DESC_F_NEXT | (DESC_F_NEXT if more else 0), nxt)
        if rnd.random() < 0.2:
            drv.ram.write(base + 0x8000, rnd.randbytes(16 * rnd.randint(1, 8)))  # an indirect table
        drv.publish(rnd.choice([0, 0, 0, rnd.randrange(2**16)]))
        if rnd.random() < 0.1:
            drv.set_avail_idx(rnd.randrange(2**16))  # avail index jumps
        drv.kick(force=True)
        # The kick is served after the BAR write is answered; any register read queues behind it.
        status = drv.status()
        assert remote.alive(), f"case {case}: remote died\n{remote.log_text()[-3000:]}"
        if status & Status.NEEDS_RESET:
            broke += 1
        elif drv.used_idx():
            completed += 1
    # After all that, a reset device works normally and the image is intact where no OUT went.
    drv.init()
    assert drv.write(8, b"\x42" * 4096).status == BLK_S_OK
    assert drv.read(8, 4096).data == b"\x42" * 4096
    assert remote.alive(), remote.log_text()[-3000:]
    assert "Traceback" not in remote.log_text()
    print(f"hostile cases: {CASES}, NEEDS_RESET: {broke}, completed: {completed}")
    assert broke > 0 and completed > 0, (broke, completed)
    assert len(image.read_bytes()) == IMAGE  # never resized
