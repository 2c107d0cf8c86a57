"""The remote transport's fast path against the codec path, on the same bytes over real sockets.

The fast path (mpqemu_mgmt/remote/transport.py) must yield exactly what the endpoint and
``decode`` yield: the same messages, the same errors, the same RET bytes, and the same fd
ownership. Each case is run twice over a fresh socketpair, once with ``fast_path=False`` (every
byte through the sans-IO endpoint) and once with the fast path, and the transcripts are compared.
Also: the rules the fast path enforces itself, and the hot-mode read timeout (SO_RCVTIMEO).
"""

from __future__ import annotations

import array
import gc
import os
import socket
import struct
import threading
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpqemu_mgmt.errors import ProtocolError
from mpqemu_mgmt.protocol import (
    BarRead,
    PciConfigRead,
    PciConfigWrite,
    Ret,
    SetIrqfd,
    encode,
    wire,
)
from mpqemu_mgmt.protocol.messages import close_message, encode_frame, reply_expected
from mpqemu_mgmt.remote.transport import Transport

Frame = tuple[bytes, int]  # bytes, number of fds sent with the first byte


def _send(sock: socket.socket, data: bytes, nfds: int) -> list[int]:
    fds = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(nfds)]
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sent = sock.sendmsg([data], anc)
    if sent < len(data):
        sock.sendall(data[sent:])
    return fds


def transcript(frames: list[Frame], fast: bool, shut: bool = True) -> list[Any]:
    """Send ``frames`` (then EOF), serve them with one transport; what happened, in order."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours: list[int] = []
    out: list[Any] = []
    try:
        for data, nfds in frames:
            if data:
                ours += _send(a, data, nfds)
        if shut:
            a.shutdown(socket.SHUT_WR)
        t = Transport(b, "remote", fast_path=fast)
        value = 0x1234
        for _ in range(len(frames) + 2):
            try:
                msg = t.read_message()
            except ProtocolError as exc:
                out.append(("error", type(exc).__name__, str(exc)))
                break
            if msg is None:
                out.append(("closed",))
                break
            # OwnedFd fields compare as equal: also record how many fds each message owns
            out.append(("msg", msg, isinstance(msg, SetIrqfd)))
            close_message(msg)
            if reply_expected(msg):
                value = value * 3 + 1
                t.send_message(Ret(value & wire.UINT64_MAX))
        t.close()
        b.shutdown(socket.SHUT_WR)
        a.settimeout(5)
        got = b""
        while chunk := a.recv(4096):
            got += chunk
        out.append(("sent", got))
    finally:
        a.close()
        b.close()
        for fd in ours:
            os.close(fd)
    return out


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def same_both_ways(frames: list[Frame]) -> list[Any]:
    # An fd owned by garbage an earlier test left in a reference cycle would be closed by
    # whichever collection runs next, in the middle of this count: collect it first, and keep
    # the collector off while counting (what this test creates it closes deterministically).
    gc.collect()
    gc.disable()
    try:
        before = _open_fds()
        slow = transcript(frames, fast=False)
        quick = transcript(frames, fast=True)
        assert quick == slow
        assert _open_fds() == before  # every received fd was closed on both paths
    finally:
        gc.enable()
    return quick


def cfg_read(addr: int = 0, length: int = 4) -> Frame:
    return encode(PciConfigRead(addr, length))[0], 0


# -- fixed cases ------------------------------------------------------------------------------


def test_common_requests_are_read_and_answered_identically() -> None:
    frames = [
        cfg_read(0, 4),
        (encode(PciConfigWrite(0x10, 0xFFFFFFFF, 4))[0], 0),
        (encode(BarRead(0xFE000000, 8, True, 0))[0], 0),
        (encode_frame(wire.Cmd.BAR_WRITE, wire.BAR_ACCESS.pack(0xC000, 0xAB, 1, 0)), 0),
        (encode_frame(wire.Cmd.DEVICE_RESET), 0),
        cfg_read(0x3C, 1),
    ]
    out = same_both_ways(frames)
    assert [o[0] for o in out] == ["msg"] * 6 + ["closed", "sent"]
    # six RETs of 24 bytes each, as encode() makes them
    assert len(out[-1][1]) == 6 * 24


def test_fd_carrying_and_odd_frames_go_through_the_codec_and_agree() -> None:
    frames = [
        (encode_frame(wire.Cmd.SET_IRQFD), 2),  # fds: codec path
        cfg_read(),
        (encode_frame(wire.Cmd.PCI_CFGREAD, b"\0" * 8), 0),  # wrong size: InvalidMessage
    ]
    out = same_both_ways(frames)
    assert out[0][0] == "msg" and out[0][2] is True
    assert out[2][0] == "error"


def test_fds_on_a_fast_command_are_closed_like_the_codec_does() -> None:
    out = same_both_ways([(cfg_read()[0], 2)])
    assert out[0][0] == "msg"


@pytest.mark.parametrize("cut", [1, 15, 16, 17, 27])
def test_eof_inside_a_fast_message_matches(cut: int) -> None:
    out = same_both_ways([(cfg_read()[0][:cut], 0)])
    assert out[0][0] == ("closed" if cut == 16 else "error")


def test_ret_from_the_proxy_is_refused_the_same_way() -> None:
    out = same_both_ways([(encode_frame(wire.Cmd.RET, b"\1" * 8), 0)])
    assert out[0][0] == "error"


# -- random frames ----------------------------------------------------------------------------

_CMDS = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, -1, 0x7FFFFFFF])
_SIZES = st.sampled_from([0, 8, 12, 24, 192, 193]) | st.integers(0, 200)


@st.composite
def frames(draw: st.DrawFn) -> Frame:
    cmd = draw(_CMDS)
    size = draw(_SIZES)
    payload = draw(st.binary(min_size=size, max_size=size))
    data = struct.pack("<iIQ", cmd, draw(st.integers(0, 2**32 - 1)), size) + payload
    if draw(st.integers(0, 9)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return data, draw(st.sampled_from([0, 0, 0, 1, 2]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(frames(), min_size=1, max_size=4))
def test_random_frames_agree(fs: list[Frame]) -> None:
    same_both_ways(fs)


@settings(max_examples=100, deadline=None)
@given(
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(-(2**31), 2**31 - 1),
    st.integers(0, 2**64 - 1),
)
def test_random_valid_accesses_agree(addr: int, value: int, length: int, bar: int) -> None:
    frames = [
        (encode_frame(wire.Cmd.PCI_CFGREAD, wire.PCI_CONF.pack(addr, value, length)), 0),
        (encode_frame(wire.Cmd.PCI_CFGWRITE, wire.PCI_CONF.pack(addr, value, length)), 0),
        (encode_frame(wire.Cmd.BAR_READ, wire.BAR_ACCESS.pack(bar, bar ^ 5, value, value & 0xFF)), 0),
        (encode_frame(wire.Cmd.BAR_WRITE, wire.BAR_ACCESS.pack(bar, value, length & 0xFF, 1)), 0),
    ]
    out = same_both_ways(frames)
    assert [o[0] for o in out[:4]] == ["msg"] * 4


# -- the rules the fast path enforces itself ------------------------------------------------------


def test_next_message_before_the_ret_is_refused() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(cfg_read()[0] * 2)
        t = Transport(b, "remote")
        assert t.read_message() == PciConfigRead(0, 4)
        with pytest.raises(ProtocolError, match="before answering"):
            t.read_message()


def test_only_a_ret_may_be_sent_for_a_fast_request() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(cfg_read()[0])
        t = Transport(b, "remote")
        assert t.read_message() is not None
        with pytest.raises(ProtocolError, match="may only send RET"):
            t.send_message(PciConfigRead(0, 4))


def test_ret_sizes_other_than_8_encode_through_the_codec() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.sendall(encode_frame(wire.Cmd.DEVICE_RESET))
        t = Transport(b, "remote")
        assert t.read_message() is not None
        t.send_message(Ret(0, 0))
        assert a.recv(64) == encode(Ret(0, 0))[0]
        with pytest.raises(ProtocolError):
            a.sendall(cfg_read()[0])
            t.read_message()
            t.send_message(Ret(1 << 64))  # does not fit: refused, as the endpoint refuses it


# -- hot mode: SO_RCVTIMEO on the socket ------------------------------------------------------------


def _rcvtimeo(sock: socket.socket, seconds: float) -> None:
    sock.setsockopt(
        socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, int(seconds * 1_000_000))
    )


def test_timeout_at_a_boundary_reaches_the_caller_and_loses_nothing() -> None:
    a, b = socket.socketpair()
    with a, b:
        _rcvtimeo(b, 0.01)
        t = Transport(b, "remote")
        with pytest.raises(BlockingIOError):
            t.read_message()
        a.sendall(cfg_read(8, 4)[0])
        assert t.read_message() == PciConfigRead(8, 4)


@pytest.mark.parametrize("cut", [8, 16, 20])
def test_a_message_that_stalls_longer_than_the_timeout_is_still_read_whole(cut: int) -> None:
    a, b = socket.socketpair()
    with a, b:
        _rcvtimeo(b, 0.01)
        data = cfg_read(4, 2)[0]
        a.sendall(data[:cut])

        def rest() -> None:
            time.sleep(0.08)
            a.sendall(data[cut:])

        th = threading.Thread(target=rest)
        th.start()
        try:
            t = Transport(b, "remote")
            t0 = time.monotonic()
            assert t.read_message() == PciConfigRead(4, 2)
            assert time.monotonic() - t0 >= 0.05
        finally:
            th.join(5)
