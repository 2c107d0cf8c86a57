"""The sans-IO mpqemu codec: layouts, validity rules (mpqemu_msg_valid), framing, endpoint tables, fds."""

from __future__ import annotations

import gc
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpqemu_mgmt.errors import InvalidMessage, ProtocolError, TooManyFds, TruncatedMessage
from mpqemu_mgmt.protocol import (
    UINT64_MAX,
    BarRead,
    BarWrite,
    Cmd,
    ConnectionClosed,
    DeviceReset,
    FdBundle,
    Message,
    MessageReceived,
    OwnedFd,
    PciConfigRead,
    PciConfigWrite,
    ProxyEndpoint,
    RemoteEndpoint,
    ReplyReceived,
    Ret,
    SetIrqfd,
    State,
    SyncSysmem,
    SysmemRegion,
    decode,
    encode,
    wire,
)
from mpqemu_mgmt.protocol.decoder import Decoder
from mpqemu_mgmt.protocol.endpoint import PROXY_TABLE, REMOTE_TABLE
from mpqemu_mgmt.protocol.messages import encode_frame, message_fds


class Fds:
    """Fake fd numbers; the injected closer records closes so leaks and double closes show."""

    def __init__(self) -> None:
        self.n = 100
        self.closed: list[int] = []
        self.made: list[int] = []

    def __call__(self, count: int) -> list[OwnedFd]:
        out = []
        for _ in range(count):
            self.n += 1
            self.made.append(self.n)
            out.append(OwnedFd(self.n, self.closed.append))
        return out

    def all_closed_once(self) -> bool:
        return sorted(self.closed) == sorted(self.made)


@pytest.fixture
def fds() -> Fds:
    return Fds()


# -------------------------------------------------------------------------- layouts and encoding


def test_layout_sizes_match_x86_64_structs() -> None:
    assert wire.HEADER_SIZE == 16
    assert wire.SYNC_SYSMEM.size == 192 == wire.MAX_PAYLOAD
    assert wire.PCI_CONF.size == 12
    assert wire.BAR_ACCESS.size == 24
    assert [c.value for c in Cmd] == list(range(8))


@pytest.mark.parametrize(
    ("msg", "hex_"),
    [
        (PciConfigRead(0x10, 4), "03000000" "00000000" "0c00000000000000" "10000000" "00000000" "04000000"),
        (
            PciConfigWrite(0x04, 0x0507, 2),
            "02000000" "00000000" "0c00000000000000" "04000000" "07050000" "02000000",
        ),
        (PciConfigRead(0, -1), "03000000" "00000000" "0c00000000000000" "00000000" "00000000" "ffffffff"),
        (
            BarRead(0xFEBFF000, 4, True),
            "05000000" "00000000" "1800000000000000"
            "00f0bffe00000000" "0000000000000000" "04000000" "01000000",
        ),
        (
            BarWrite(0xC083, 0xFA, 1, False),
            "04000000" "00000000" "1800000000000000"
            "83c0000000000000" "fa00000000000000" "01000000" "00000000",
        ),
        (DeviceReset(), "07000000" "00000000" "0000000000000000"),
        (Ret(0x1B36), "01000000" "00000000" "0800000000000000" "361b000000000000"),
        (Ret(0, size=0), "01000000" "00000000" "0000000000000000"),
        (Ret(UINT64_MAX), "01000000" "00000000" "0800000000000000" "ffffffffffffffff"),
    ],
)
def test_encode_exact_bytes(msg: Message, hex_: str) -> None:
    data, fdnums = encode(msg)
    assert data.hex() == hex_
    assert fdnums == ()


def test_encode_sync_sysmem_places_regions_in_slots(fds: Fds) -> None:
    f = fds(2)
    msg = SyncSysmem((SysmemRegion(0, 0xC0000, 0, f[0]), SysmemRegion(0x100000, 0x7F00000, 0x100000, f[1])))
    data, fdnums = encode(msg)
    assert fdnums == (f[0].fileno(), f[1].fileno())
    assert data[:16] == struct.pack("<i4xQ", 0, 192)
    gpas = struct.unpack_from("<8Q", data, 16)
    sizes = struct.unpack_from("<8Q", data, 16 + 64)
    offsets = struct.unpack_from("<8q", data, 16 + 128)
    assert gpas[:3] == (0, 0x100000, 0) and sizes[:3] == (0xC0000, 0x7F00000, 0)
    assert offsets[:2] == (0, 0x100000) and set(gpas[2:] + sizes[2:] + offsets[2:]) == {0}


def test_encode_set_irqfd_carries_two_fds(fds: Fds) -> None:
    a, b = fds(2)
    data, fdnums = encode(SetIrqfd(a, b))
    assert data == bytes.fromhex("06000000000000000000000000000000")
    assert fdnums == (a.fileno(), b.fileno())


@pytest.mark.parametrize(
    "msg",
    [
        PciConfigRead(0x100000000, 4),
        BarWrite(0, 1 << 64, 4, True),
        Ret(1 << 64),
        Ret(0x100, size=1),
        Ret(0, size=193),
    ],
)
def test_encode_refuses_values_that_do_not_fit(msg: Message) -> None:
    with pytest.raises(ProtocolError):
        encode(msg)


def test_encode_refuses_sync_sysmem_without_or_with_too_many_regions(fds: Fds) -> None:
    with pytest.raises(ProtocolError):
        encode(SyncSysmem(()))
    with pytest.raises(ProtocolError):
        encode(SyncSysmem(tuple(SysmemRegion(0, 1, 0, f) for f in fds(9))))


# -------------------------------------------------------------------------- validity (mpqemu_msg_valid)

BAR = bytes(24)
CONF = bytes(12)
SYSMEM = bytes(192)

# (cmd, payload, nfds, expected): expected is a message type or an error class.
VALIDITY = [
    (-1, b"", 0, InvalidMessage),
    (8, b"", 0, InvalidMessage),
    (0x7FFFFFFF, b"", 0, InvalidMessage),
    (Cmd.SYNC_SYSMEM, SYSMEM, 0, InvalidMessage),  # needs >= 1 fd
    (Cmd.SYNC_SYSMEM, SYSMEM[:191], 1, InvalidMessage),
    (Cmd.SYNC_SYSMEM, SYSMEM, 1, SyncSysmem),
    (Cmd.SYNC_SYSMEM, SYSMEM, 7, SyncSysmem),
    (Cmd.SYNC_SYSMEM, SYSMEM, 8, SyncSysmem),  # deliberate: stock rejects 8, the proxy sends 8
    (Cmd.SYNC_SYSMEM, SYSMEM, 9, TooManyFds),
    (Cmd.PCI_CFGREAD, CONF, 0, PciConfigRead),
    (Cmd.PCI_CFGREAD, CONF, 3, PciConfigRead),  # fds allowed by QEMU (and closed by us)
    (Cmd.PCI_CFGREAD, CONF + b"\0", 0, InvalidMessage),
    (Cmd.PCI_CFGWRITE, CONF[:11], 0, InvalidMessage),
    (Cmd.PCI_CFGWRITE, CONF, 8, InvalidMessage),  # num_fds >= REMOTE_MAX_FDS
    (Cmd.BAR_READ, BAR, 0, BarRead),
    (Cmd.BAR_READ, BAR, 1, InvalidMessage),
    (Cmd.BAR_WRITE, BAR[:23], 0, InvalidMessage),
    (Cmd.BAR_WRITE, BAR, 0, BarWrite),
    (Cmd.SET_IRQFD, b"", 2, SetIrqfd),
    (Cmd.SET_IRQFD, b"", 1, InvalidMessage),
    (Cmd.SET_IRQFD, b"", 3, InvalidMessage),
    (Cmd.SET_IRQFD, b"\0", 2, InvalidMessage),
    (Cmd.DEVICE_RESET, b"", 0, DeviceReset),
    (Cmd.DEVICE_RESET, bytes(192), 2, DeviceReset),  # no extra checks for reset
    (Cmd.DEVICE_RESET, bytes(193), 0, InvalidMessage),  # "Invalid size for message"
    (Cmd.RET, b"", 0, Ret),
    (Cmd.RET, bytes(16), 0, Ret),
]


@pytest.mark.parametrize(("cmd", "payload", "nfds", "expected"), VALIDITY)
def test_validity_rules(fds: Fds, cmd: int, payload: bytes, nfds: int, expected: type) -> None:
    given_fds = fds(nfds)
    if issubclass(expected, Exception):
        with pytest.raises(expected):
            decode(int(cmd), payload, given_fds)
        assert fds.all_closed_once()
        return
    msg = decode(int(cmd), payload, given_fds)
    assert isinstance(msg, expected)
    kept = {f.fileno() for f in message_fds(msg)}
    # Fds the message does not own were closed; the ones it owns are still open.
    assert set(fds.closed) == set(fds.made) - kept
    assert len(kept) == (nfds if expected in (SyncSysmem, SetIrqfd) else 0)


def test_decode_fields_of_config_and_bar_messages() -> None:
    assert decode(3, wire.PCI_CONF.pack(0xFD, 0, -4), []) == PciConfigRead(0xFD, -4)
    assert decode(2, wire.PCI_CONF.pack(4, 7, 2), []) == PciConfigWrite(4, 7, 2)
    payload = struct.pack("<QQIB3x", 0xC000, 0, 2, 0)
    assert decode(5, payload, []) == BarRead(0xC000, 2, False)
    # C bool: any non-zero byte means memory.
    payload = struct.pack("<QQIB3x", 0xFE000000, 5, 4, 7)
    assert decode(4, payload, []) == BarWrite(0xFE000000, 5, 4, True)


@pytest.mark.parametrize(
    ("payload", "value"),
    [(b"", 0), (b"\x12\x34", 0x3412), (bytes(range(1, 17)), 0x0807060504030201)],
)
def test_short_and_long_ret_read_like_the_zero_filled_proxy_buffer(payload: bytes, value: int) -> None:
    msg = decode(1, payload, [])
    assert msg == Ret(value, len(payload))


# -------------------------------------------------------------------------- framing


def test_decoder_byte_by_byte_and_fds_travel_with_the_first_byte(fds: Fds) -> None:
    f = fds(2)
    data = encode(SetIrqfd(f[0], f[1]))[0] + encode(PciConfigRead(0, 2))[0]
    dec = Decoder()
    received = fds(2)
    out: list[Message] = []
    for i, byte in enumerate(data):
        dec.feed(bytes([byte]), received if i == 0 else [])
        msg = dec.next_message()
        while msg is not None:
            out.append(msg)
            msg = dec.next_message()
    assert [type(m) for m in out] == [SetIrqfd, PciConfigRead]
    assert message_fds(out[0]) == tuple(received)
    assert dec.at_boundary


def test_decoder_oversized_header_fails_before_payload_and_closes_fds(fds: Fds) -> None:
    dec = Decoder()
    dec.feed(struct.pack("<i4xQ", 2, 193), fds(3))
    with pytest.raises(InvalidMessage, match="Invalid size"):
        dec.next_message()
    assert fds.all_closed_once()
    with pytest.raises(ProtocolError):
        dec.feed(b"x", fds(1))
    assert fds.all_closed_once()


def test_decoder_too_many_fds_refused_once_the_payload_is_in(fds: Fds) -> None:
    # mpqemu_msg_recv reads the payload first, then checks the fd count ("Overflow error").
    dec = Decoder()
    dec.feed(struct.pack("<i4xQ", 0, 192), fds(9))
    assert dec.next_message() is None
    dec.feed(bytes(192))
    with pytest.raises(TooManyFds):
        dec.next_message()
    assert fds.all_closed_once()


def test_decoder_ctrunc_refuses_the_message_even_with_few_fds(fds: Fds) -> None:
    dec = Decoder()
    dec.feed(encode(DeviceReset())[0], fds(1), ctrunc=True)
    with pytest.raises(TooManyFds, match="truncated"):
        dec.next_message()
    assert fds.all_closed_once()


def test_decoder_ctrunc_then_eof_before_payload_is_clean(fds: Fds) -> None:
    dec = Decoder()
    dec.feed(struct.pack("<i4xQ", 0, 192), fds(16), ctrunc=True)
    assert dec.next_message() is None
    dec.feed_eof()
    assert fds.all_closed_once()


def test_eof_after_a_whole_header_before_any_payload_is_a_clean_close(fds: Fds) -> None:
    # Stock quirk: qio_channel_readv_full_all_eof returns 0 without error when nothing was read.
    dec = Decoder()
    dec.feed(encode(PciConfigWrite(4, 1, 2))[0][:16], fds(2))
    assert dec.next_message() is None
    dec.feed_eof()
    assert fds.all_closed_once()


@pytest.mark.parametrize("cut", [1, 15, 17, 20])
def test_eof_inside_a_message_is_truncated(fds: Fds, cut: int) -> None:
    dec = Decoder()
    dec.feed(encode(PciConfigWrite(4, 1, 2))[0][:cut], fds(1))
    assert dec.next_message() is None
    with pytest.raises(TruncatedMessage):
        dec.feed_eof()
    assert fds.all_closed_once()


def test_eof_at_boundary_is_clean() -> None:
    dec = Decoder()
    dec.feed_eof()
    dec.feed(encode(DeviceReset())[0])
    assert isinstance(dec.next_message(), DeviceReset)
    dec.feed_eof()


def test_wants_reports_exact_lengths() -> None:
    dec = Decoder()
    assert dec.wants() == (16, True)
    dec.feed(encode(BarRead(0, 4, True))[0][:10])
    assert dec.wants() == (6, True)
    dec.feed(encode(BarRead(0, 4, True))[0][10:16])
    assert dec.wants() == (24, False)


# -------------------------------------------------------------------------- endpoint tables


def test_tables_name_every_allowed_transition_only() -> None:
    assert set(REMOTE_TABLE.values()) <= {State.IDLE, State.REPLY_DUE, State.CLOSED}
    # The remote never sends unless a reply is due; the proxy never has two requests out.
    assert not any(ev.name == "SEND_RET" and st is State.IDLE for st, ev in REMOTE_TABLE)
    assert not any(ev.name == "SEND_REQUEST" and st is State.AWAITING_REPLY for st, ev in PROXY_TABLE)


def test_remote_holds_the_next_request_until_it_replied() -> None:
    remote = RemoteEndpoint()
    two = encode(PciConfigRead(0, 2))[0] + encode(PciConfigRead(2, 2))[0]
    ev = remote.receive_data(two)
    assert ev == [MessageReceived(PciConfigRead(0, 2), True)]
    assert remote.state is State.REPLY_DUE and remote.pending_request is Cmd.PCI_CFGREAD
    remote.send(Ret(0x1B36))
    assert remote.next_events() == [MessageReceived(PciConfigRead(2, 2), True)]


def test_remote_notices_need_no_reply(fds: Fds) -> None:
    remote = RemoteEndpoint()
    frame = encode(DeviceReset())[0]
    irq = encode_frame(Cmd.SET_IRQFD)
    ev = remote.receive_data(irq, fds(2))
    assert isinstance(ev[0], MessageReceived) and not ev[0].reply_expected
    assert remote.state is State.IDLE
    assert remote.receive_data(frame) == [MessageReceived(DeviceReset(), True)]


def test_remote_never_sends_unsolicited() -> None:
    remote = RemoteEndpoint()
    with pytest.raises(ProtocolError):
        remote.send(Ret(0))
    assert remote.state is State.FAILED


def test_remote_refuses_to_send_anything_but_ret() -> None:
    remote = RemoteEndpoint()
    remote.receive_data(encode(DeviceReset())[0])
    with pytest.raises(ProtocolError):
        remote.send(DeviceReset())


def test_remote_treats_ret_from_the_proxy_as_unknown_command() -> None:
    remote = RemoteEndpoint()
    with pytest.raises(InvalidMessage, match="Unknown command"):
        remote.receive_data(encode(Ret(0))[0])
    assert remote.state is State.FAILED


def test_remote_eof() -> None:
    remote = RemoteEndpoint()
    assert remote.receive_eof() == [ConnectionClosed(None)]
    assert remote.state is State.CLOSED
    remote = RemoteEndpoint()
    remote.receive_data(encode(DeviceReset())[0])
    assert remote.receive_eof() == [ConnectionClosed(Cmd.DEVICE_RESET)]


def test_proxy_one_request_outstanding() -> None:
    proxy = ProxyEndpoint()
    proxy.send(PciConfigRead(0, 2))
    assert proxy.state is State.AWAITING_REPLY
    with pytest.raises(ProtocolError):
        proxy.send(PciConfigRead(2, 2))


def test_proxy_notices_do_not_wait(fds: Fds) -> None:
    proxy = ProxyEndpoint()
    a, b = fds(2)
    proxy.send(SetIrqfd(a, b))
    assert proxy.state is State.IDLE


def test_proxy_reply_and_unsolicited() -> None:
    proxy = ProxyEndpoint()
    proxy.send(BarRead(0xC000, 1, False))
    assert proxy.receive_data(encode(Ret(7))[0]) == [ReplyReceived(Ret(7), Cmd.BAR_READ)]
    with pytest.raises(ProtocolError, match="unsolicited"):
        proxy.receive_data(encode(Ret(7))[0])


def test_proxy_rejects_a_non_ret_reply() -> None:
    proxy = ProxyEndpoint()
    proxy.send(DeviceReset())
    with pytest.raises(InvalidMessage):
        proxy.receive_data(encode(DeviceReset())[0])


# -------------------------------------------------------------------------- fd ownership


def test_owned_fd_close_detach_and_gc() -> None:
    closed: list[int] = []
    a = OwnedFd(5, closed.append)
    a.close()
    a.close()
    assert closed == [5] and a.closed
    b = OwnedFd(6, closed.append)
    assert b.detach() == 6
    del b
    gc.collect()
    assert closed == [5]
    c = OwnedFd(7, closed.append)
    del c
    gc.collect()
    assert closed == [5, 7]
    with pytest.raises(ProtocolError):
        OwnedFd(-1, closed.append)


def test_fd_bundle_adopt_closes_everything_on_failure() -> None:
    closed: list[int] = []
    with pytest.raises(ProtocolError):
        FdBundle.adopt([3, 4, -1, 6], closed.append)
    assert sorted(closed) == [3, 4, 6]
    bundle = FdBundle.adopt([8, 9], closed.append)
    assert bundle.numbers() == (8, 9) and len(bundle[1:]) == 1
    with bundle:
        pass
    assert closed[-2:] == [8, 9]


# -------------------------------------------------------------------------- properties

u32 = st.integers(0, (1 << 32) - 1)
u64 = st.integers(0, (1 << 64) - 1)
i32 = st.integers(-(1 << 31), (1 << 31) - 1)
plain_messages = st.one_of(
    st.builds(PciConfigRead, u32, i32, u32),
    st.builds(PciConfigWrite, u32, u32, i32),
    st.builds(BarRead, u64, u32, st.booleans(), u64),
    st.builds(BarWrite, u64, u64, u32, st.booleans()),
    st.just(DeviceReset()),
    st.builds(Ret, u64),
)


@given(plain_messages)
def test_encode_decode_round_trip(msg: Message) -> None:
    data, _ = encode(msg)
    cmd, size = wire.HEADER.unpack_from(data)
    assert size == len(data) - 16
    again = decode(cmd, data[16:], [])
    assert again == msg
    assert encode(again)[0] == data


@settings(max_examples=300)
@given(st.binary(max_size=600), st.integers(0, 20), st.lists(st.integers(1, 50), max_size=8))
def test_random_bytes_never_escape_the_error_tree_nor_leak(data: bytes, nfds: int, cuts: list[int]) -> None:
    fds = Fds()
    remote = RemoteEndpoint()
    pieces: list[bytes] = []
    rest = data
    for c in cuts:
        pieces.append(rest[:c])
        rest = rest[c:]
    pieces.append(rest)
    msgs: list[Message] = []
    try:
        for i, piece in enumerate(pieces):
            for ev in remote.receive_data(piece, fds(nfds) if i == 0 else []):
                if isinstance(ev, MessageReceived):
                    msgs.append(ev.message)
                    if ev.reply_expected:
                        remote.send(Ret(UINT64_MAX))
                        for later in remote.next_events():
                            assert isinstance(later, MessageReceived)
                            msgs.append(later.message)
        remote.receive_eof()
    except ProtocolError:
        pass
    finally:
        remote.close()
    for m in msgs:
        for f in message_fds(m):
            f.close()
    assert fds.all_closed_once()


def test_codec_imports_no_io_modules() -> None:
    # DESIGN.md: the sans-IO codec imports no socket, os or asyncio (OwnedFd's close is injected).
    import ast
    from pathlib import Path

    import mpqemu_mgmt.protocol as pkg

    forbidden = {"os", "socket", "asyncio", "select", "selectors", "subprocess"}
    for name in ("__init__", "wire", "fds", "messages", "decoder", "endpoint"):
        tree = ast.parse((Path(pkg.__file__).parent / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                mods = {(node.module or "").split(".")[0]}
            else:
                continue
            assert not mods & forbidden, f"protocol/{name}.py imports {mods & forbidden}"
