"""Our vfio-user server loop with the real in-tree models, driven by a vfio-user client over a
real socketpair (the server in a thread; QEMU 11.1's client is in test_vfio_user_qemu11.py)."""

from __future__ import annotations

import contextlib
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mpqemu_mgmt.errors import ProtocolError
from mpqemu_mgmt.protocol.vfio_user import wire
from mpqemu_mgmt.remote.vfio_user_serve import serve_vfio_user
from mpqemu_mgmt.testing.builtin_remote import device_status
from mpqemu_mgmt.testing.vfio_user_client import ErrorReply, VfioUserClient

CMD = 0x04
MEM_MASTER = 0x2 | 0x4


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@dataclass
class Served:
    client: VfioUserClient
    thread: threading.Thread
    result: dict[str, object]


@pytest.fixture
def serve() -> Iterator[object]:
    started: list[Served] = []

    def start(model: str) -> Served:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        result: dict[str, object] = {}

        def run() -> None:
            try:
                result["rc"] = serve_vfio_user(ours, model)
            except Exception as exc:
                result["exc"] = exc
            finally:
                ours.close()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        served = Served(VfioUserClient(theirs), thread, result)
        started.append(served)
        served.client.sock.settimeout(10)
        return served

    yield start
    for s in started:
        s.client.close()
        s.thread.join(5)
        assert not s.thread.is_alive()


def eventfd_count(fd: int, timeout: float) -> int:
    r, _, _ = select.select([fd], [], [], timeout)
    return int.from_bytes(os.read(fd, 8), "little") if r else 0


def test_pci_testdev_regions_config_and_tests(serve) -> None:  # type: ignore[no-untyped-def]
    s = serve("pci-testdev")
    c = s.client
    ver = c.handshake()
    assert (ver.major, ver.minor) == (0, 0)
    info = c.device_info()
    assert info.num_regions == 9 and info.num_irqs == 5
    assert info.flags == wire.DEVICE_FLAGS_PCI | wire.DEVICE_FLAGS_RESET
    sizes = [c.region_info(i).size for i in range(9)]
    assert sizes == [4096, 256, 0, 0, 0, 0, 0, 256, 0]
    assert c.config_read(0, 4) == 0x00051B36
    assert c.config_read(0x10, 4) & 1 == 0 and c.config_read(0x14, 4) & 1 == 1  # BAR0 mem, BAR1 I/O
    assert c.irq_info(wire.IRQ_INTX).count == 0  # no interrupt pin
    full = c.read_bytes(wire.REGION_CONFIG, 0, 256)  # QEMU reads all of it at realize
    assert full[:4] == bytes.fromhex("361b0500")
    c.write(0, 0, 1, 0)  # select test 0 (mmio-no-eventfd)
    assert c.read(0, 0, 1) == 0 and c.read(0, 8, 1) == 0xFA
    c.write(0, 2048, 1, 0xFA)
    c.write(0, 2048, 1, 0xFA, posted=True)  # a posted write (NO_REPLY) is applied in order too
    assert c.read(0, 12, 4) == 2
    c.reset()
    assert c.read(0, 0, 1) == 0 and c.read(0, 12, 4) == 0  # reset stops the test
    with pytest.raises(ErrorReply) as bad:
        c.read(0, 4095, 2)  # past the end of BAR0
    assert bad.value.details["errno"] == wire.EINVAL
    with pytest.raises(ErrorReply):
        c.read(2, 0, 4)  # BAR2 does not exist


def test_edu_intx_is_automasked_and_resignalled_on_unmask(serve) -> None:  # type: ignore[no-untyped-def]
    s = serve("edu")
    c = s.client
    c.handshake()
    assert c.irq_info(wire.IRQ_INTX).count == 1
    assert c.irq_info(wire.IRQ_INTX).flags & wire.IRQ_INFO_AUTOMASKED
    efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    try:
        c.set_intx_eventfd(efd)
        c.config_write(CMD, 2, MEM_MASTER)
        c.write(0, 0x60, 4, 0x5)  # raise
        assert eventfd_count(efd, 2) == 1
        assert c.read(0, 0x24, 4) == 0x5
        assert c.config_read(0x06, 2) & 0x8  # status: Interrupt Status
        c.write(0, 0x60, 4, 0x2)  # still high and masked: no second edge
        assert eventfd_count(efd, 0.1) == 0
        c.unmask_intx()  # the client's EOI: line still high -> signal again
        assert eventfd_count(efd, 2) == 1
        c.write(0, 0x64, 4, 0x7)  # ack everything: line low
        c.unmask_intx()
        assert eventfd_count(efd, 0.2) == 0
        c.write(0, 0x08, 4, 5)  # factorial with IRQ on completion
        c.write(0, 0x20, 4, 0x80)
        c.write(0, 0x08, 4, 5)
        assert eventfd_count(efd, 2) == 1
        assert c.read(0, 0x08, 4) == 120
    finally:
        c.set_intx_eventfd(None)
        os.close(efd)


def _dma_roundtrip(c: VfioUserClient, ram_read, ram_write, pump: bool) -> None:  # type: ignore[no-untyped-def]
    def transfer(src: int, dst: int, count: int, cmd: int) -> None:
        for reg, val in ((0x80, src), (0x88, dst), (0x90, count), (0x98, cmd)):
            c.write(0, reg, 8, val)
        deadline = time.monotonic() + 5
        while c.read(0, 0x98, 8) & 1:
            if pump:
                c.pump(0.05)
            assert time.monotonic() < deadline
            time.sleep(0.02)

    c.config_write(CMD, 2, MEM_MASTER)
    pattern = bytes(range(256)) * 4
    ram_write(0x1000, pattern)
    transfer(0x1000, 0x40000, len(pattern), 0x1)
    transfer(0x40000, 0x3000, len(pattern), 0x3)
    assert ram_read(0x3000, len(pattern)) == pattern


def test_edu_dma_through_a_shared_memfd(serve) -> None:  # type: ignore[no-untyped-def]
    s = serve("edu")
    c = s.client
    c.handshake()
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, 1 << 20)
    try:
        c.map_fd(0, 1 << 20, fd)

        def ram_read(addr: int, n: int) -> bytes:
            return os.pread(fd, n, addr)

        def ram_write(addr: int, data: bytes) -> None:
            os.pwrite(fd, data, addr)

        _dma_roundtrip(c, ram_read, ram_write, pump=False)
        with pytest.raises(ErrorReply) as dup:
            c.map_fd(0x1000, 4096, fd)  # overlaps
        assert dup.value.details["errno"] == wire.EEXIST
        c.unmap(0, 1 << 20)
        with pytest.raises(ErrorReply):
            c.unmap(0, 1 << 20)
    finally:
        os.close(fd)


def test_edu_dma_by_message_when_memory_is_not_shared(serve) -> None:  # type: ignore[no-untyped-def]
    s = serve("edu")
    c = s.client
    c.handshake()
    ram = c.map_inband(0, 1 << 16)

    def ram_read(addr: int, n: int) -> bytes:
        return bytes(ram[addr : addr + n])

    def ram_write(addr: int, data: bytes) -> None:
        ram[addr : addr + len(data)] = data

    _dma_roundtrip(c, ram_read, ram_write, pump=True)
    assert c.dma_served >= 2


def test_session_closes_every_fd_it_received(serve) -> None:  # type: ignore[no-untyped-def]
    before = open_fds()
    s = serve("edu")
    c = s.client
    c.handshake()
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    mfd = os.memfd_create("ram", os.MFD_CLOEXEC)
    os.ftruncate(mfd, 1 << 16)
    c.set_intx_eventfd(efd)
    c.set_intx_eventfd(efd)  # replacing closes the previous copy
    c.map_fd(0, 1 << 16, mfd)
    with pytest.raises(ErrorReply):
        c.call(__import__("mpqemu_mgmt.protocol.vfio_user.messages", fromlist=["x"]).DeviceReset(), (efd,))
    os.close(efd)
    os.close(mfd)
    c.close()
    s.thread.join(5)
    assert s.result.get("rc") == 0
    assert open_fds() == before


def test_bad_framing_ends_the_session_without_leaks(serve) -> None:  # type: ignore[no-untyped-def]
    before = open_fds()
    s = serve("pci-testdev")
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    s.client.send_raw(wire.HEADER.pack(1, 1, 1 << 30, 0, 0), (efd,))  # msg_size over the bound
    os.close(efd)
    s.thread.join(5)
    assert isinstance(s.result.get("exc"), ProtocolError)
    s.client.close()
    assert open_fds() == before


@pytest.mark.parametrize("seccomp", ["off", "enforce"])
def test_remote_process_serves_vfio_user_and_exits_zero_on_close(seccomp: str) -> None:
    """Contracts 1: python -m mpqemu_mgmt.remote --transport vfio-user on an inherited fd."""
    with remote_process("edu", "--seccomp", seccomp) as c:
        assert c.config_read(0, 4) == 0x11E81234
        c.write(0, 0x04, 4, 0x12345678)
        assert c.read(0, 0x04, 4) == 0xFFFFFFFF ^ 0x12345678
        efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        c.set_intx_eventfd(efd)
        c.write(0, 0x60, 4, 1)
        assert eventfd_count(efd, 5) == 1
        os.close(efd)


@contextlib.contextmanager
def remote_process(model: str, *args: str, keep: tuple[int, ...] = ()) -> Iterator[VfioUserClient]:
    """``python -m mpqemu_mgmt.remote --transport vfio-user`` on a socketpair, handshaken; on a
    clean exit of the block the client closes and the remote must exit 0."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mpqemu_mgmt.remote", "--device", model, "--fd", str(theirs.fileno()),
         "--transport", "vfio-user", *args],
        pass_fds=(theirs.fileno(), *keep),
        stderr=subprocess.PIPE,
    )
    theirs.close()
    try:
        ours.settimeout(20)
        c = VfioUserClient(ours)
        c.handshake()
        yield c
        c.close()
        assert proc.wait(20) == 0, proc.stderr.read().decode() if proc.stderr else ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


@pytest.mark.parametrize("poll_us", [None, "0"])
def test_vfio_user_requests_are_found_by_polling(tmp_path: Path, poll_us: str | None) -> None:
    """The vfio-user loop polls the socket after each reply like the mpqemu one (polling.py),
    confined by its seccomp filter; ``--poll-us 0`` turns it off."""
    qmp = str(tmp_path / "q.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(qmp)
    listener.listen(1)
    extra = ["--poll-us", poll_us] if poll_us is not None else []
    with listener, remote_process("pci-testdev", "--qmp-fd", str(listener.fileno()), "--seccomp", "enforce",
                                  *extra, keep=(listener.fileno(),)) as c:
        for _ in range(300):
            assert c.config_read(0, 4) == 0x00051B36
        poll = device_status(qmp)["loop"]["poll"]
        if poll_us is None:
            assert poll["max_us"] == 200.0 and poll["hits"] > 60, poll  # most, on a quiet host
        else:
            assert poll == {"max_us": 0.0, "window_us": 0.0, "hits": 0, "misses": 0}
        assert c.config_read(0, 4) == 0x00051B36  # QMP in between did not disturb the loop
