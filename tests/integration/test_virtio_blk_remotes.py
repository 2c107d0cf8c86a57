"""The virtio-blk test spawner (mpqemu_mgmt.testing.virtio_blk_remotes) owns its fds.

:func:`builtin_blk` hands the remote one socket end and the backing fd; the parent must keep no
copy of either (a kept socket end would hide the proxy's EOF from the remote, a kept backing fd
would outlive the remote), the remote must exit 0 when the proxy end closes, and a backing file
that cannot be opened must leave nothing open behind.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from mpqemu_mgmt.testing.virtio_blk_remotes import BuiltinBlkRemote, attach, builtin_blk


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _targets(fds: set[str]) -> set[str]:
    out = set()
    for fd in fds:
        try:
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    return out


def test_parent_keeps_no_copy_and_remote_exits_0_on_eof(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    before = _open_fds()
    with builtin_blk(image, workdir=tmp_path, seccomp="off") as (remote, sock):
        # Only our proxy end and the log file are new in the parent: the remote end and the
        # backing fd went to the child.
        new = _open_fds() - before
        assert str(image) not in _targets(new)
        assert len(new) == 2, _targets(new)
        with attach(sock) as att:
            assert att.driver.init().capacity == (1 << 20) // 512
        sock.shutdown(socket.SHUT_RDWR)
        assert remote.wait(10) == 0, remote.log_text()
    assert _open_fds() - before == set()


def test_unopenable_image_closes_the_socket_end(tmp_path: Path) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a:
        remote_fd = b.detach()
        with pytest.raises(FileNotFoundError):
            BuiltinBlkRemote(tmp_path / "missing.img", remote_fd, workdir=tmp_path)
        with pytest.raises(OSError):
            os.fstat(remote_fd)
        # The peer sees EOF: nobody holds the other end any more.
        a.settimeout(5)
        assert a.recv(1) == b""
