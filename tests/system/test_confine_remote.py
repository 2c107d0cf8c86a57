"""The real remote emulator (``python -m mpqemu_mgmt.remote``) under the launcher, seccomp enforced.

For each model: the host sees ``Seccomp: 2``, ``NoNewPrivs: 1``, a non-zero uid, no capabilities,
namespaces different from its own and exactly the fds it was given (plus those it received over
the mpqemu socket); it serves QMP on the inherited listening fd; virtio-blk does real I/O on its
backing fd through the Python virtio driver over ProxySim without tripping its filter; and it
exits 0 when the proxy closes (Contracts 1).
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mpqemu_mgmt.confine.launcher import LaunchedRemote, LaunchRequest, launch
from mpqemu_mgmt.confine.profile import ConfinementProfile
from mpqemu_mgmt.testing.virtio_blk_remotes import attach

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="confinement with a uid drop needs root"),
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
    pytest.mark.timeout(60),
]


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _fds(pid: int) -> dict[int, str]:
    return {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}


def _argv_fd(pid: int, flag: str) -> int:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return int(argv[argv.index(flag) + 1])


@pytest.fixture
def remote(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[LaunchedRemote]:
    model: str = request.param
    backing: tuple[Path, ...] = ()
    if model == "virtio-blk":
        image = tmp_path / "disk.img"
        image.write_bytes(bytes(range(256)) * 4096)  # 1 MiB, a known pattern
        backing = (image,)
    req = LaunchRequest("r0", model, tmp_path / "r0.qmp", backing=backing, log_path=tmp_path / "r0.log")
    launched = launch(req, ConfinementProfile())
    try:
        launched.wait_ready(20)
        yield launched
    finally:
        launched.stop(1.0)


@pytest.mark.parametrize("remote", ["pci-testdev", "edu", "virtio-blk"], indirect=True)
def test_real_remote_confined(remote: LaunchedRemote) -> None:
    pid = remote.pid
    status = _status(pid)
    # the device itself, not bwrap: the interpreter the launcher ran (comm is 15 bytes at most)
    assert status["Name"] == Path(sys.executable).name[:15]  # LaunchRequest.python by default
    assert status["Seccomp"] == "2" and int(status["Seccomp_filters"]) >= 1
    assert status["NoNewPrivs"] == "1"
    assert "0" not in status["Uid"].split() and "0" not in status["Gid"].split()
    assert status["CapEff"] == status["CapPrm"] == status["CapBnd"] == "0000000000000000"
    for ns in ("user", "pid", "net", "ipc", "uts", "mnt"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    fds = _fds(pid)
    allowed = {0, 1, 2, _argv_fd(pid, "--fd"), _argv_fd(pid, "--qmp-fd")}
    if "--backing-fd" in Path(f"/proc/{pid}/cmdline").read_text():
        backing = _argv_fd(pid, "--backing-fd")
        allowed.add(backing)
        assert fds[backing].endswith("disk.img")
    # a QMP client connection the readiness check just closed may linger for a moment
    extra = {fd: t for fd, t in fds.items() if fd not in allowed and not t.startswith("socket:")}
    assert not extra, extra
    assert fds[0] == "/dev/null"
    assert remote.confinement.to_dict() == {
        "seccomp": "enforce", "namespaces": ["user", "pid", "net", "ipc", "uts", "cgroup", "mnt"],
        "uid": int(status["Uid"].split()[0])}


@pytest.mark.parametrize("remote", ["pci-testdev"], indirect=True)
def test_qmp_and_clean_exit(remote: LaunchedRemote) -> None:
    with socket.socket(socket.AF_UNIX) as client:
        client.settimeout(10)
        client.connect(str(remote.qmp_path))
        reader = client.makefile("rb")
        assert b'"QMP"' in reader.readline()
        client.sendall(b'{"execute":"qmp_capabilities"}\n{"execute":"query-status"}\n')
        assert reader.readline().startswith(b'{"return": {}')
        assert b'"running": true' in reader.readline()
    remote.proxy.close()  # the proxy goes away: the remote exits 0
    report = remote.check_exit(10)
    assert report.returncode == 0


@pytest.mark.parametrize("remote", ["virtio-blk"], indirect=True)
def test_virtio_blk_io_under_enforce(remote: LaunchedRemote, tmp_path: Path) -> None:
    with attach(remote.proxy, timeout=10) as att:
        att.driver.init()
        first: Any = att.driver.read(0, 4096)
        assert first.status == 0 and first.data == bytes(range(256)) * 16
        assert att.driver.write(8, b"\xa5" * 4096).status == 0
        assert att.driver.flush().status == 0  # fdatasync on the passed-in fd
        again: Any = att.driver.read(8, 4096)
        assert again.data == b"\xa5" * 4096
        # the remote now also holds what the proxy sent: the RAM memfd, irqfd and resamplefd
        kinds = sorted(t.split(":")[0] for t in _fds(remote.pid).values())
        assert kinds.count("anon_inode") >= 2
    assert remote.poll() is None and _status(remote.pid)["Seccomp"] == "2"
    image = (tmp_path / "disk.img").read_bytes()
    assert image[8 * 512: 8 * 512 + 4096] == b"\xa5" * 4096  # really written through the fd
    assert image[:4096] == bytes(range(256)) * 16
    assert remote.log_path is not None
    assert "Traceback" not in remote.log_path.read_text()
