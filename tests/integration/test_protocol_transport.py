"""The mpqemu transport over real AF_UNIX socketpairs: fds, MSG_CTRUNC, EOF, partial reads, EINTR."""

from __future__ import annotations

import array
import mmap
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from mpqemu_mgmt.errors import InvalidMessage, ProtocolError, TooManyFds, TruncatedMessage
from mpqemu_mgmt.protocol import (
    BarRead,
    DeviceReset,
    PciConfigRead,
    Ret,
    SetIrqfd,
    SyncSysmem,
    close_message,
    encode,
)
from mpqemu_mgmt.protocol.messages import encode_frame
from mpqemu_mgmt.remote.transport import Transport, wrap_fd
from mpqemu_mgmt.testing.proxysim import memfd_region

Pair = tuple[socket.socket, socket.socket]


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(5)
    b.settimeout(5)
    yield a, b
    a.close()
    b.close()


def send_with_fds(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])


def test_sync_sysmem_fds_arrive_cloexec_and_map_the_same_memory(pair: Pair) -> None:
    proxy_sock, remote_sock = pair
    before = open_fds()
    region = memfd_region(4096, gpa=0x100000)
    os.pwrite(region.fd.fileno(), b"hello", 0)
    Transport(proxy_sock, "proxy").send_message(SyncSysmem((region,)))
    remote = Transport(remote_sock, "remote")
    msg = remote.read_message()
    assert isinstance(msg, SyncSysmem)
    got = msg.regions[0]
    assert (got.gpa, got.size, got.offset) == (0x100000, 4096, 0)
    assert got.fd.fileno() != region.fd.fileno()
    # MSG_CMSG_CLOEXEC: a received fd must not leak into children we exec.
    assert os.get_inheritable(got.fd.fileno()) is False
    with mmap.mmap(got.fd.fileno(), 4096, mmap.MAP_SHARED) as m:
        assert m[:5] == b"hello"
    close_message(msg)
    region.fd.close()
    assert open_fds() == before


def test_request_reply_round_trip(pair: Pair) -> None:
    proxy = Transport(pair[0], "proxy")
    remote = Transport(pair[1], "remote")
    proxy.send_message(PciConfigRead(0, 2))
    assert remote.read_message() == PciConfigRead(0, 2)
    remote.send_message(Ret(0x1B36))
    reply = proxy.read_reply()
    assert reply is not None and reply.reply == Ret(0x1B36)


def test_reading_before_replying_is_refused(pair: Pair) -> None:
    pair[0].sendall(encode(DeviceReset())[0])
    remote = Transport(pair[1], "remote")
    assert remote.read_message() == DeviceReset()
    with pytest.raises(ProtocolError):
        remote.read_message()


def test_more_fds_than_the_control_buffer_is_ctrunc_and_nothing_leaks(
    pair: Pair,
) -> None:
    before = open_fds()
    r, w = os.pipe()
    send_with_fds(pair[0], encode_frame(0, bytes(192)), [r] * 20)
    os.close(r)
    os.close(w)
    with pytest.raises(TooManyFds, match="truncated"):
        Transport(pair[1], "remote").read_message()
    assert open_fds() == before


def test_nine_fds_is_too_many(pair: Pair) -> None:
    before = open_fds()
    r, w = os.pipe()
    send_with_fds(pair[0], encode_frame(0, bytes(192)), [r] * 9)
    os.close(r)
    os.close(w)
    with pytest.raises(TooManyFds):
        Transport(pair[1], "remote").read_message()
    assert open_fds() == before


def test_invalid_message_closes_its_fds(pair: Pair) -> None:
    before = open_fds()
    r, w = os.pipe()
    send_with_fds(pair[0], encode_frame(int(SetIrqfd.cmd)), [r, w, r])  # 3 fds: invalid
    os.close(r)
    os.close(w)
    with pytest.raises(InvalidMessage):
        Transport(pair[1], "remote").read_message()
    assert open_fds() == before


def test_eof_before_header_is_clean(pair: Pair) -> None:
    pair[0].shutdown(socket.SHUT_WR)
    remote = Transport(pair[1], "remote")
    assert remote.read_message() is None
    assert remote.closed_by_peer
    assert remote.read_message() is None  # asking again after the close stays a clean None


def test_eof_right_after_a_header_is_a_clean_close_like_stock(pair: Pair) -> None:
    pair[0].sendall(encode(BarRead(0xC000, 1, False))[0][:16])
    pair[0].shutdown(socket.SHUT_WR)
    assert Transport(pair[1], "remote").read_message() is None


@pytest.mark.parametrize("cut", [3, 17, 30])
def test_eof_inside_a_message_is_truncated(pair: Pair, cut: int) -> None:
    pair[0].sendall(encode(BarRead(0xC000, 1, False))[0][:cut])
    pair[0].shutdown(socket.SHUT_WR)
    with pytest.raises(TruncatedMessage):
        Transport(pair[1], "remote").read_message()


def test_header_and_payload_in_dribbles(pair: Pair) -> None:
    data = encode(BarRead(0xFE000000, 4, True))[0]

    def dribble() -> None:
        for i in range(len(data)):
            pair[0].send(data[i : i + 1])
            time.sleep(0.001)

    t = threading.Thread(target=dribble)
    t.start()
    assert Transport(pair[1], "remote").read_message() == BarRead(0xFE000000, 4, True)
    t.join()


def test_fds_sent_with_payload_bytes_are_dropped_not_leaked(pair: Pair) -> None:
    # mpqemu_msg_recv reads the payload without a control buffer: the kernel discards such fds.
    before = open_fds()
    data = encode(PciConfigRead(0, 4))[0]
    r, w = os.pipe()
    pair[0].sendall(data[:16])
    send_with_fds(pair[0], data[16:], [r, w])
    os.close(r)
    os.close(w)
    assert Transport(pair[1], "remote").read_message() == PciConfigRead(0, 4)
    assert open_fds() == before


def test_eintr_is_retried(pair: Pair) -> None:
    hits: list[int] = []
    old = signal.signal(signal.SIGALRM, lambda *_: hits.append(1))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.02, 0.02)
        timer = threading.Timer(0.2, lambda: pair[0].sendall(encode(DeviceReset())[0]))
        timer.start()
        assert Transport(pair[1], "remote").read_message() == DeviceReset()
        timer.join()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert hits, "the read was never interrupted"


def test_set_irqfd_eventfds_are_live(pair: Pair) -> None:
    irq, resample = wrap_fd(os.eventfd(0)), wrap_fd(os.eventfd(0))
    Transport(pair[0], "proxy").send_message(SetIrqfd(irq, resample))
    msg = Transport(pair[1], "remote").read_message()
    assert isinstance(msg, SetIrqfd)
    os.eventfd_write(msg.irqfd.fileno(), 1)
    assert os.eventfd_read(irq.fileno()) == 1
    close_message(msg)
    irq.close()
    resample.close()


def test_send_splits_after_first_sendmsg_with_fds_first(pair: Pair) -> None:
    # A large write that the kernel takes in pieces still carries its fds on the first piece.
    a, b = pair
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    blob = struct.pack("<i4xQ", 3, 12) + bytes(12)
    payload = blob * 4000
    r, w = os.pipe()

    first_fds: list[int] = []

    def reader() -> None:
        frame = Transport(b).read_raw_frame()
        assert frame is not None
        first_fds.append(len(frame[1]))
        frame[1].close()
        got = len(frame[0])
        while got < len(payload):
            got += len(b.recv(65536))

    t = threading.Thread(target=reader)
    t.start()
    Transport(a, "proxy").send_raw(payload, [r])
    t.join(5)
    os.close(r)
    os.close(w)
    assert first_fds == [1]
    assert not t.is_alive()
