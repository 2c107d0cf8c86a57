"""The remote as a process: Contracts 1 entry point, exit codes, its QMP monitor, guest RAM and DMA.

Real processes and sockets: ``python -m mpqemu_mgmt.remote`` on a socketpair, ProxySim as the
proxy, qemu.qmp's QMPClient on the monitor (the client the service heartbeats with), memfds as
guest RAM. The edu remote runs with its seccomp filter enforced, so every path here (QMP accept,
SYNC_SYSMEM mmap, DMA, eventfds) is also a check of the allowlist.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from mpqemu_mgmt.procfs import proc_cpu_ticks
from mpqemu_mgmt.protocol import UINT64_MAX, SysmemRegion
from mpqemu_mgmt.testing.builtin_remote import BuiltinRemote
from mpqemu_mgmt.testing.proxysim import ProxySim, memfd_region

REMOTE = [sys.executable, "-m", "mpqemu_mgmt.remote"]


def qmp_listener(tmp_path: Path) -> tuple[socket.socket, str]:
    """What the manager does: bind and listen; the remote only gets the fd."""
    path = str(tmp_path / "remote.qmp")
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(path)
    lst.listen(1)
    return lst, path


async def qmp_session(path: str, *commands: tuple[str, dict[str, Any] | None]) -> list[Any]:
    client = QMPClient("test")
    await asyncio.wait_for(client.connect(path), 5)
    try:
        return [await asyncio.wait_for(client.execute(c, a), 5) for c, a in commands]
    finally:
        await client.disconnect()


def run_qmp(path: str, *commands: tuple[str, dict[str, Any] | None]) -> list[Any]:
    return asyncio.run(qmp_session(path, *commands))


@pytest.fixture
def edu(tmp_path: Path) -> Iterator[tuple[BuiltinRemote, ProxySim, str]]:
    lst, path = qmp_listener(tmp_path)
    with (
        BuiltinRemote.pair("edu", workdir=tmp_path, qmp_listener=lst, seccomp="enforce") as (remote, sock),
        ProxySim(sock) as px,
    ):
        px.map_bars()
        px.config_write(0x04, px.config_read(0x04, 2) | 0x4, 2)  # bus master for DMA
        yield remote, px, path


# -- entry point and exit codes ------------------------------------------------------------------


def test_exit_zero_when_peer_closes(tmp_path: Path) -> None:
    with BuiltinRemote.pair("pci-testdev", workdir=tmp_path, seccomp="enforce") as (remote, sock):
        with ProxySim(sock) as px:
            assert px.config_read(0, 4) == 0x00051B36
        assert remote.wait(5) == 0
        assert "Traceback" not in remote.log_text()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--device", "edu", "--fd", "0"], "is not an open socket"),  # stdin is /dev/null
        (["--device", "nosuch", "--fd", "{sock}"], "unknown device model"),
        (["--device", "edu"], "required"),
        (["--device", "edu", "--fd", "{sock}", "--qmp-fd", "{sock}"], "is not a listening socket"),
        (["--device", "edu", "--fd", "{sock}", "--seccomp", "bogus"], "invalid choice"),
        (["--device", "edu", "--fd", "{sock}", "--poll-us", "-5"], "not between 0 and 10000"),
        (["--device", "edu", "--fd", "{sock}", "--poll-us", "lots"], "invalid _poll_us value"),
    ],
)
def test_bad_arguments_exit_2(args: list[str], needle: str) -> None:
    a, b = socket.socketpair()
    argv = [x.replace("{sock}", str(b.fileno())) for x in args]
    proc = subprocess.run(
        [*REMOTE, *argv],
        pass_fds=[b.fileno()],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    a.close()
    b.close()
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr


def test_protocol_error_exits_1(tmp_path: Path) -> None:
    with BuiltinRemote.pair("edu", workdir=tmp_path) as (remote, sock):
        sock.sendall((99).to_bytes(4, "little") + bytes(12))  # unknown command 99
        assert remote.wait(5) == 1
        assert "protocol error" in remote.log_text()


# -- adaptive polling (remote/polling.py) -----------------------------------------------------------


@pytest.mark.parametrize("poll_us", [None, "0"])
def test_back_to_back_requests_are_found_by_polling(tmp_path: Path, poll_us: str | None) -> None:
    """The real remote, confined by its own seccomp filter (sched_yield, MSG_DONTWAIT allowed):
    back-to-back requests are picked up by the busy-poll window; ``--poll-us 0`` turns it off."""
    lst, path = qmp_listener(tmp_path)
    extra = ["--poll-us", poll_us] if poll_us is not None else []
    with BuiltinRemote.pair("pci-testdev", workdir=tmp_path, qmp_listener=lst, seccomp="enforce",
                            extra_args=extra) as (remote, sock):
        with ProxySim(sock) as px:
            for _ in range(500):
                assert px.config_read(0, 4) == 0x00051B36
            [st] = run_qmp(path, ("x-device-status", None))
            # an idle guest costs no polling: the window closes, the loop sleeps in poll
            before = proc_cpu_ticks(remote.pid)
            time.sleep(1.0)
            after = proc_cpu_ticks(remote.pid)
            assert before is not None and after is not None
            assert after - before <= 5  # at most 50 ms of CPU in 1 s idle
        assert remote.wait(5) == 0 and "Traceback" not in remote.log_text()
    poll = st["loop"]["poll"]
    if poll_us is None:  # the default window: up to 200 us
        assert poll["max_us"] == 200.0 and poll["hits"] > 100, poll  # most, on a quiet host
    else:
        assert poll == {"max_us": 0.0, "window_us": 0.0, "hits": 0, "misses": 0}
    assert st["messages"]["PciConfigRead"] >= 500


# -- QMP monitor ----------------------------------------------------------------------------------


def test_qmp_with_qemu_qmp_client(edu: tuple[BuiltinRemote, ProxySim, str]) -> None:
    remote, px, path = edu
    status, version, dev = run_qmp(
        path, ("query-status", None), ("query-version", None), ("x-device-status", None)
    )
    assert status == {"status": "running", "singlestep": False, "running": True}
    assert version["qemu"]["major"] == 7
    assert dev["model"] == "edu" and dev["pid"] == remote.pid
    assert dev["bars"][0]["size"] == 1 << 20
    # a second session after the first one left (one client at a time, served in turn)
    [dev2] = run_qmp(path, ("x-device-status", None))
    assert dev2["messages"]["PciConfigRead"] > dev["messages"]["PciConfigRead"] - 1
    assert px.config_read(0, 4) == 0x11E81234  # the device loop kept serving throughout


def test_qmp_raw_protocol_errors(edu: tuple[BuiltinRemote, ProxySim, str]) -> None:
    _, px, path = edu
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(5)
        c.connect(path)
        with c.makefile("rwb") as f:
            assert b'"QMP"' in f.readline()

            def cmd(raw: bytes) -> bytes:
                f.write(raw + b"\n")
                f.flush()
                return f.readline()

            assert b"Expecting capabilities negotiation" in cmd(b'{"execute": "query-status", "id": 7}')
            reply = cmd(b'{"execute": "qmp_capabilities", "id": "a"}')
            assert b'"return": {}' in reply and b'"id": "a"' in reply
            assert b"CommandNotFound" in cmd(b'{"execute": "device_add"}')
            assert b"GenericError" in cmd(b"[1, 2]")
            assert b"parse error" in cmd(b"{nonsense}")
            assert b'"running": true' in cmd(b'{"execute": "query-status"}')
    assert px.config_read(0, 2) == 0x1234


def test_qmp_quit_exits_zero(edu: tuple[BuiltinRemote, ProxySim, str]) -> None:
    remote, _, path = edu
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(5)
        c.connect(path)
        with c.makefile("rwb") as f:
            f.readline()
            f.write(b'{"execute": "qmp_capabilities"}{"execute": "quit", "id": 1}\n')
            f.flush()
            assert f.readline().strip() == b'{"return": {}}'
            assert f.readline().strip() == b'{"return": {}, "id": 1}'
            assert b'"SHUTDOWN"' in f.readline()
    assert remote.wait(5) == 0


def test_qmp_path_option(tmp_path: Path) -> None:
    path = str(tmp_path / "dev.qmp")
    with (
        BuiltinRemote.pair("pci-testdev", workdir=tmp_path, extra_args=("--qmp", path)) as (_r, sock),
        ProxySim(sock) as px,
    ):
        px.config_read(0, 4)  # the remote is up
        [st] = run_qmp(path, ("query-status", None))
        assert st["running"] is True


# -- guest RAM and DMA ------------------------------------------------------------------------------


def dma(px: ProxySim, src: int, dst: int, count: int, cmd: int) -> None:
    px.bar_write_at(0, 0x80, src, 4)
    px.bar_write_at(0, 0x88, dst, 4)
    px.bar_write_at(0, 0x90, count, 4)
    px.bar_write_at(0, 0x98, cmd, 4)
    deadline = time.monotonic() + 5
    while px.bar_read_at(0, 0x98, 4) & 1:
        assert time.monotonic() < deadline, "DMA never finished"
        time.sleep(0.01)


def test_dma_round_trip_through_guest_ram(edu: tuple[BuiltinRemote, ProxySim, str]) -> None:
    _, px, path = edu
    low = memfd_region(0xA0000, gpa=0)
    high = memfd_region(0x100000, gpa=0x100000, offset=0x100000)  # offset inside its fd, like pc RAM
    px.sync_sysmem([low, high])
    pattern = os.urandom(1024)
    os.pwrite(high.fd.fileno(), pattern, 0x100000 + 0x2000)  # gpa 0x102000
    dma(px, 0x102000, 0x40000, 1024, 1)  # RAM -> device
    dma(px, 0x40000, 0x9F000, 1024, 3)  # device -> RAM (the low region)
    assert os.pread(low.fd.fileno(), 1024, 0x9F000) == pattern
    # a transfer that crosses out of RAM (0xA0000 is a hole) is refused and touches nothing
    os.pwrite(low.fd.fileno(), bytes(0x1000), 0x9F000)
    dma(px, 0x40000, 0x9FC00, 2048, 3)
    assert os.pread(low.fd.fileno(), 0x1000, 0x9F000) == bytes(0x1000)
    [st] = run_qmp(path, ("x-device-status", None))
    assert st["dma"] == {"running": False, "done": 2, "failed": 1}
    assert st["memory"]["regions"] == [
        {"gpa": 0, "size": 0xA0000, "offset": 0},
        {"gpa": 0x100000, "size": 0x100000, "offset": 0x100000},
    ]
    # an identical re-sync is not remapped; a different one is
    px.sync_sysmem([low, high])
    px.sync_sysmem([memfd_region(0x200000, gpa=0)])
    [st] = run_qmp(path, ("x-device-status", None))
    assert (st["memory"]["syncs"], st["memory"]["remaps"]) == (3, 2)
    # after the re-sync the old RAM is gone: DMA into it fails, the new one works
    dma(px, 0x40000, 0x102000, 16, 3)
    assert px.bar_read_at(0, 0x00, 4) == 0x010000ED
    for r in (low, high):
        r.fd.close()


def test_short_memfd_is_not_mapped(edu: tuple[BuiltinRemote, ProxySim, str]) -> None:
    """A region claiming more bytes than its file holds would SIGBUS on access: it is left out."""
    _, px, path = edu
    fd = os.memfd_create("short", os.MFD_CLOEXEC)
    os.ftruncate(fd, 0x1000)
    from mpqemu_mgmt.protocol import OwnedFd

    region = SysmemRegion(0, 0x100000, 0, OwnedFd(fd, os.close))
    px.sync_sysmem([region])
    dma(px, 0x40000, 0x800, 16, 3)
    [st] = run_qmp(path, ("x-device-status", None))
    assert st["memory"]["regions"] == [] and st["dma"]["failed"] == 1
    region.fd.close()


def test_device_reset_and_bad_bar_sizes(edu: tuple[BuiltinRemote, ProxySim, str]) -> None:
    _, px, _ = edu
    ret = px.device_reset()
    assert (ret.value, ret.size) == (0, 0)  # the stock remote's size-0 RET
    addr, _ = px.bar_address(0)
    from mpqemu_mgmt.protocol import BarRead

    for size in (0, 3, 16):
        assert px.request(BarRead(addr, size, True)).value == UINT64_MAX
    assert px.bar_read_at(0, 0, 2) == 0xFFFF  # edu: sizes other than 4/8 read as all-ones
    assert px.bar_read_at(0, 0x80, 8) == 0


def test_qmp_one_client_at_a_time_and_split_input(edu: tuple[BuiltinRemote, ProxySim, str]) -> None:
    _, px, path = edu
    with socket.socket(socket.AF_UNIX) as a, socket.socket(socket.AF_UNIX) as b:
        a.settimeout(5)
        a.connect(path)
        with a.makefile("rwb") as fa:
            assert b'"QMP"' in fa.readline()
            b.connect(path)  # queued in the backlog: no greeting while the first client stays
            b.settimeout(0.3)
            with pytest.raises(TimeoutError):
                b.recv(1)
            # a command split over several writes is assembled before it runs
            for chunk in (b'{"execute": "qmp_capa', b'bilities"', b', "id": 1}\n'):
                a.sendall(chunk)
                time.sleep(0.05)
            assert fa.readline().strip() == b'{"return": {}, "id": 1}'
            assert px.config_read(0, 2) == 0x1234  # the device is served meanwhile
            fa.close()
            a.close()
            b.settimeout(5)
            assert b'"QMP"' in b.recv(4096)  # the next client is served once the first left
