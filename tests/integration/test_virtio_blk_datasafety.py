"""No data loss: a write completed before a completed FLUSH is in the backing file, even when the
remote is SIGKILLed the moment the FLUSH completes. Also: our remote under its seccomp policy.

The remote never buffers guest data in its own memory: OUT requests are ``pwritev`` from guest
RAM into the backing fd before they complete, and FLUSH is ``fdatasync`` before it completes
(mpqemu_mgmt/devices/virtio/blockio.py). These tests check the observable half of that — the
file holds every completed write after a SIGKILL — for ours and, as a reference, for QEMU's.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mpqemu_mgmt import resources
from mpqemu_mgmt.devices.virtio.constants import BLK_S_OK, BLK_T_FLUSH, BLK_T_GET_ID, BLK_T_IN, BLK_T_OUT
from mpqemu_mgmt.testing.virtio_blk_remotes import attach, builtin_blk, stock_blk
from mpqemu_mgmt.testing.virtio_driver import Request

IMAGE = 8 << 20
SECTORS = IMAGE // 512


def _kill_after_flush(opener: Callable[..., Any], tmp_path: Path, **kw: Any) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(IMAGE))
    rnd = random.Random(7)
    expected = bytearray(IMAGE)
    with opener(image, workdir=tmp_path, **kw) as (remote, sock), attach(sock) as att:
        drv = att.driver
        drv.init()
        for round_ in range(5):
            batch = []
            # In-flight requests have no order (QEMU runs them in parallel), so the writes of
            # one batch go to distinct 128 KiB slots.
            for slot in rnd.sample(range(SECTORS // 256), 8):
                sector = slot * 256 + rnd.randrange(0, 8)
                data = rnd.randbytes(rnd.choice([512, 4096, 65536, 126976]))
                batch.append(Request(BLK_T_OUT, sector, data=data, seg_size=rnd.choice([0, 4096])))
                expected[sector * 512 : sector * 512 + len(data)] = data
            done = drv.run([*batch, Request(BLK_T_FLUSH)])
            assert all(c.status == BLK_S_OK for c in done), done
            if round_ == 4:
                # The FLUSH completed: kill at once, with no chance to clean up.
                os.kill(remote.pid, signal.SIGKILL)
                assert remote.wait(5) == -signal.SIGKILL
    fd = os.open(image, os.O_RDONLY)
    try:
        on_disk = os.pread(fd, IMAGE, 0)
    finally:
        os.close(fd)
    assert on_disk == bytes(expected)


def test_ours_keeps_flushed_writes_across_sigkill(tmp_path: Path) -> None:
    _kill_after_flush(builtin_blk, tmp_path, seccomp="off")


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 is not installed")
def test_stock_reference_keeps_flushed_writes_across_sigkill(tmp_path: Path) -> None:
    _kill_after_flush(stock_blk, tmp_path)


def _policy_allows(*names: str) -> list[str]:
    text = (resources.data_dir("policies") / "x86_64" / "virtio-blk.policy").read_text()
    common = (resources.data_dir("policies") / "x86_64" / "common_device.policy").read_text()
    allowed = {line.split(":")[0].strip() for line in (text + common).splitlines() if ":" in line}
    return [n for n in names if n not in allowed]


def test_ours_under_its_seccomp_policy(tmp_path: Path) -> None:
    # CPython's os.preadv/os.pwritev call preadv2/pwritev2 whenever the C library has them
    # (Modules/posixmodule.c), so those are the syscalls the data path makes.
    missing = _policy_allows("preadv2", "pwritev2", "fdatasync")
    if missing:
        pytest.skip(f"policies/x86_64/virtio-blk.policy does not allow {', '.join(missing)} (yet)")
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(IMAGE))
    with builtin_blk(image, workdir=tmp_path, seccomp="enforce") as (remote, sock), attach(sock) as att:
        drv = att.driver
        drv.init()
        assert drv.write(10, b"s" * 8192, seg_size=4096).status == BLK_S_OK
        assert drv.read(10, 8192, indirect=True).data == b"s" * 8192
        assert drv.flush().status == BLK_S_OK
        assert drv.run([Request(BLK_T_GET_ID, read_len=20)])[0].status == BLK_S_OK
        assert drv.run([Request(BLK_T_IN, SECTORS, read_len=512)])[0].status != BLK_S_OK
        assert remote.alive(), remote.log_text()
    assert image.read_bytes()[10 * 512 : 10 * 512 + 8192] == b"s" * 8192


def test_readonly_fd_is_never_written(tmp_path: Path) -> None:
    """--readonly with an O_RDONLY fd: writes fail with IOERR, the file is untouched."""
    image = tmp_path / "disk.img"
    image.write_bytes(b"\x11" * IMAGE)
    with builtin_blk(image, workdir=tmp_path, readonly=True, seccomp="off") as (remote, sock):
        with attach(sock) as att:
            drv = att.driver
            drv.init()
            assert drv.write(0, b"x" * 512).status != BLK_S_OK
            assert drv.run([Request(BLK_T_OUT, 0, data=b"y" * 512)])[0].status != BLK_S_OK
            assert drv.read(0, 512).data == b"\x11" * 512
        assert remote.alive()
    assert image.read_bytes() == b"\x11" * IMAGE
