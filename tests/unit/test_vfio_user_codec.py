"""The vfio-user codec and server endpoint: round trips, validity rules, state table."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpqemu_mgmt.errors import InvalidMessage, TruncatedMessage
from mpqemu_mgmt.protocol.vfio_user import codec, wire
from mpqemu_mgmt.protocol.vfio_user import messages as m
from mpqemu_mgmt.protocol.vfio_user.endpoint import (
    Rejected,
    ReplyReceived,
    RequestReceived,
    ServerCaps,
    ServerEndpoint,
    State,
    StrayReply,
    negotiate,
)
from mpqemu_mgmt.protocol.vfio_user.wire import Command, Header

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)

QEMU_CAPS = {
    "max_msg_fds": 16,
    "max_data_xfer_size": 1048576,
    "pgsizes": 4096,
    "max_dma_maps": 65535,
    "write_multiple": True,
    "migration": {"pgsize": 4096, "max_bitmap_size": 268435456},
}


def split(raw: bytes) -> tuple[Header, bytes]:
    header = wire.unpack_header(raw, wire.max_message_size(wire.DEFAULT_MAX_DATA_XFER))
    assert header.size == len(raw)
    return header, raw[wire.HEADER_SIZE :]


def roundtrip(body: object, fds: tuple[int, ...] = ()) -> object:
    header, payload = split(codec.encode(7, body))
    assert header.msg_id == 7 and not header.is_reply
    return codec.decode_request(header, payload, fds)


def qemu_version_request() -> bytes:
    """The VERSION message exactly as QEMU builds it (vfio_user_validate_version, caps_json)."""
    caps = json.dumps({"capabilities": QEMU_CAPS}).encode() + b"\0"
    body = struct.pack("<HH", 0, 0) + caps
    return wire.HEADER.pack(0, 1, 16 + len(body), 0, 0) + body


# ------------------------------------------------------------------ header framing


def test_header_is_sixteen_bytes_little_endian() -> None:
    raw = Header(0x1234, 9, 32, wire.FLAG_NO_REPLY).pack()
    assert raw == bytes.fromhex("3412 0900 20000000 10000000 00000000".replace(" ", ""))


@pytest.mark.parametrize(
    ("raw", "exc"),
    [
        (b"\0" * 15, TruncatedMessage),
        (wire.HEADER.pack(1, 1, 15, 0, 0), InvalidMessage),  # size below the header
        (wire.HEADER.pack(1, 1, 1 << 30, 0, 0), InvalidMessage),  # over the bound
        (wire.HEADER.pack(1, 1, 16, 2, 0), InvalidMessage),  # type 2 does not exist
    ],
)
def test_fatal_frame_errors(raw: bytes, exc: type[Exception]) -> None:
    with pytest.raises(exc) as info:
        wire.unpack_header(raw, 4096)
    assert info.value.details["fatal"] is True  # type: ignore[attr-defined]


# ------------------------------------------------------------------ round trips


@given(u16, u16, st.dictionaries(st.sampled_from(["max_msg_fds", "pgsizes", "x"]), st.integers(0, 1 << 40)))
def test_version_roundtrip(major: int, minor: int, caps: dict[str, int]) -> None:
    assert roundtrip(m.Version(major, minor, caps)) == m.Version(major, minor, caps)


@given(st.integers(0, 3), u64, st.integers(1, 1 << 40), st.booleans())
def test_dma_map_roundtrip(flags: int, address: int, size: int, with_fd: bool) -> None:
    address = min(address, (1 << 64) - size)
    body = m.DmaMap(flags, 4096 if with_fd else 0, address, size, 5 if with_fd else None)
    assert roundtrip(body, body.fds) == body


@given(u32, u32, st.binary(max_size=64))
def test_region_write_roundtrip(region: int, offset: int, data: bytes) -> None:
    body = m.RegionWrite(region, offset, data)
    assert roundtrip(body) == body


@given(u32, u64, u32)
def test_region_read_roundtrip(region: int, offset: int, count: int) -> None:
    assert roundtrip(m.RegionRead(region, offset, count)) == m.RegionRead(region, offset, count)


@given(st.sampled_from([wire.IRQ_SET_ACTION_MASK, wire.IRQ_SET_ACTION_UNMASK, wire.IRQ_SET_ACTION_TRIGGER]),
       st.integers(0, 4), st.lists(st.booleans(), max_size=8))
def test_set_irqs_bool_roundtrip(action: int, index: int, bools: list[bool]) -> None:
    body = m.SetIrqs(wire.IRQ_SET_DATA_BOOL | action, index, 0, len(bools), tuple(bools))
    assert roundtrip(body) == body


def test_set_irqs_eventfd_and_deassign() -> None:
    flags = wire.IRQ_SET_DATA_EVENTFD | wire.IRQ_SET_ACTION_TRIGGER
    got = roundtrip(m.SetIrqs(flags, wire.IRQ_INTX, 0, 1), (9,))
    assert isinstance(got, m.SetIrqs) and got.fds == (9,)
    got = roundtrip(m.SetIrqs(flags, wire.IRQ_INTX, 0, 1))  # no fd: de-assign
    assert isinstance(got, m.SetIrqs) and got.fds == ()


@given(st.lists(st.tuples(u32, u64, st.binary(max_size=8)), max_size=10))
def test_write_multi_roundtrip(items: list[tuple[int, int, bytes]]) -> None:
    body = m.RegionWriteMulti(tuple(m.RegionWrite(r, o, d) for r, o, d in items))
    assert roundtrip(body) == body


@given(u64, st.binary(max_size=100))
def test_dma_rw_layout_as_qemu_11_1_speaks_it(address: int, data: bytes) -> None:
    raw = codec.encode(3, m.DmaWrite(address, data))
    # address u64, count u64, data at byte 32 of the message (checked against QEMU 11.1.3)
    assert len(raw) == 32 + len(data)
    assert struct.unpack_from("<QQ", raw, 16) == (address, len(data))
    assert raw[32:] == data
    header, payload = split(raw)
    assert codec.decode_server_request(header, payload) == m.DmaWrite(address, data)
    reply = codec.encode(3, m.DmaReadReply(address, data), reply=True)
    header, payload = split(reply)
    assert codec.decode_reply(header, payload, (), Command.DMA_READ) == m.DmaReadReply(address, data)


def test_dma_read_reply_bytes_captured_from_qemu_11_1() -> None:
    """The head of a real DMA_READ reply (2048 bytes at 0x8000000) sent by QEMU 11.1.3."""
    head = bytes.fromhex("00000b0020080000" "0100000000000000" "0000000800000000" "0008000000000000")
    data = bytes(range(256)) * 8
    header, payload = split(head + data)
    got = codec.decode_reply(header, payload, (), Command.DMA_READ)
    assert got == m.DmaReadReply(0x8000000, data)


@pytest.mark.parametrize(
    "payload", [b"", bytes.fromhex("0010000800000000" "0008000000000000")]
)
def test_dma_write_reply_with_or_without_echo(payload: bytes) -> None:
    raw = Header(1, Command.DMA_WRITE, 16 + len(payload), wire.TYPE_REPLY).pack() + payload
    header, body = split(raw)
    got = codec.decode_reply(header, body, (), Command.DMA_WRITE)
    assert isinstance(got, m.DmaWriteReply)
    assert got.address == (None if not payload else 0x8001000)


@given(st.integers(0, 8), st.integers(0, 0xFFFF), u64, u64)
def test_region_info_reply_roundtrip(index: int, flags: int, size: int, offset: int) -> None:
    raw = codec.encode(1, m.RegionInfo(index, flags, size, offset), reply=True)
    header, payload = split(raw)
    assert len(payload) == 32
    got = codec.decode_reply(header, payload, (), Command.DEVICE_GET_REGION_INFO)
    assert got == m.RegionInfo(index, flags, size, offset)


# ------------------------------------------------------------------ validity rules


def raw_request(command: int, payload: bytes, flags: int = 0, error: int = 0) -> tuple[Header, bytes]:
    return Header(1, command, 16 + len(payload), flags, error), payload


@pytest.mark.parametrize(
    ("command", "payload", "fds", "errno"),
    [
        (99, b"", (), wire.ENOSYS),
        (Command.DEVICE_RESET, b"x", (), wire.EINVAL),
        (Command.DEVICE_RESET, b"", (3,), wire.EINVAL),
        (Command.DMA_MAP, struct.pack("<IIQQQ", 32, 4, 0, 0, 4096), (), wire.EINVAL),  # unknown flag
        (Command.DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, 0, 0), (), wire.EINVAL),  # empty window
        (Command.DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, (1 << 64) - 4096, 8192), (), wire.EINVAL),
        (Command.DMA_MAP, struct.pack("<IIQQQ", 32, 3, 4096, 0, 4096), (), wire.EINVAL),  # offset, no fd
        (Command.DMA_MAP, struct.pack("<IIQQQ", 32, 3, 0, 0, 4096), (3, 4), wire.EINVAL),
        (Command.DMA_MAP, struct.pack("<IIQQQ", 8, 3, 0, 0, 4096), (), wire.EINVAL),  # argsz
        (Command.DMA_UNMAP, struct.pack("<IIQQ", 24, 1, 0, 4096), (), wire.ENOTSUP),  # dirty bitmap
        (Command.REGION_READ, struct.pack("<QII", 0, 0, 4) + b"x", (), wire.EINVAL),
        (Command.REGION_WRITE, struct.pack("<QII", 0, 0, 4) + b"abc", (), wire.EINVAL),
        (Command.REGION_WRITE, struct.pack("<QII", 0, 0, 0xFFFFFFFF), (), wire.EINVAL),
        (Command.DEVICE_SET_IRQS, struct.pack("<IIIII", 20, 0x24 | 0x1, 0, 0, 1), (), wire.EINVAL),
        (Command.DEVICE_SET_IRQS, struct.pack("<IIIII", 20, 0x2 | 0x20, 0, 0, 2) + b"\1", (), wire.EINVAL),
        (Command.DEVICE_SET_IRQS, struct.pack("<IIIII", 20, 0x4 | 0x20, 0, 0, 2), (5,), wire.EINVAL),
        (Command.DEVICE_SET_IRQS, struct.pack("<IIIII", 20, 0x1 | 0x20, 0, 0, 0), (5,), wire.EINVAL),
        (Command.DEVICE_SET_IRQS, struct.pack("<IIIII", 20, 0x1 | 0x20, 0, 0xFFFFFFFF, 2), (), wire.EINVAL),
        (Command.VERSION, struct.pack("<HH", 0, 0) + b"{}", (), wire.EINVAL),  # no NUL
        (Command.VERSION, struct.pack("<HH", 0, 0) + b"[1]\0", (), wire.EINVAL),
        (Command.VERSION, struct.pack("<HH", 0, 0) + b"\xff\0", (), wire.EINVAL),
        (Command.REGION_WRITE_MULTI, struct.pack("<Q", 201), (), wire.EINVAL),
    ],
)
def test_invalid_requests_name_their_errno(
    command: int, payload: bytes, fds: tuple[int, ...], errno: int
) -> None:
    header, body = raw_request(command, payload)
    with pytest.raises(InvalidMessage) as info:
        codec.decode_request(header, body, fds)
    assert info.value.details["errno"] == errno


def test_command_with_error_bits_is_invalid() -> None:
    header, body = raw_request(Command.DEVICE_RESET, b"", flags=wire.FLAG_ERROR)
    with pytest.raises(InvalidMessage):
        codec.decode_request(header, body)


def test_unsupported_but_known_commands_decode_as_unsupported() -> None:
    header, body = raw_request(Command.DEVICE_FEATURE, b"\0" * 8)
    assert codec.decode_request(header, body) == m.Unsupported(Command.DEVICE_FEATURE, b"\0" * 8)


@given(u16, st.binary(max_size=64), st.lists(st.integers(3, 100), max_size=3))
@settings(max_examples=300)
def test_decoder_only_ever_raises_invalid_message(command: int, payload: bytes, fds: list[int]) -> None:
    header, body = raw_request(command, payload)
    try:
        codec.decode_request(header, body, tuple(fds))
    except InvalidMessage as exc:
        assert isinstance(exc.details["errno"], int)


# ------------------------------------------------------------------ endpoint


def test_negotiation_answers_qemus_offer_within_its_checks() -> None:
    header, payload = split(qemu_version_request())
    offer = codec.decode_request(header, payload)
    assert isinstance(offer, m.Version)
    reply, agreed = negotiate(offer, ServerCaps())
    assert (reply.major, reply.minor) == (0, 0)
    assert agreed.client_max_data_xfer == 1048576 and agreed.client_max_msg_fds == 16
    # only capabilities the client proposed, never write_multiple or migration
    assert set(reply.capabilities) <= set(QEMU_CAPS) - {"write_multiple", "migration"}
    raw = codec.encode(header.msg_id, reply, reply=True)
    assert raw[-1:] == b"\0"  # QEMU's "corrupt version reply" check
    assert reply.capabilities["max_msg_fds"] <= 16


@pytest.mark.parametrize(
    "caps",
    [{"max_msg_fds": -1}, {"max_msg_fds": 17}, {"max_data_xfer_size": "big"}, {"pgsizes": 512},
     {"max_msg_fds": True}],
)
def test_negotiation_refuses_malformed_caps(caps: dict[str, object]) -> None:
    with pytest.raises(InvalidMessage):
        negotiate(m.Version(0, 0, caps), ServerCaps())


def test_endpoint_state_table() -> None:
    ep = ServerEndpoint()
    header, body = raw_request(Command.DEVICE_RESET, b"")
    first = ep.receive(header, body)
    assert isinstance(first, Rejected) and first.errno == wire.EINVAL and ep.state is State.AWAIT_VERSION
    assert first.answer is not None and split(first.answer)[0].is_error

    header, payload = split(qemu_version_request())
    ev = ep.receive(header, payload)
    assert isinstance(ev, RequestReceived) and isinstance(ev.request, m.Version)
    assert ep.state is State.READY

    again = ep.receive(header, payload)
    assert isinstance(again, Rejected) and ep.state is State.READY

    header, body = raw_request(Command.DEVICE_RESET, b"")
    assert ep.receive(header, body) == RequestReceived(1, False, m.DeviceReset())


def test_endpoint_bad_major_closes_the_session() -> None:
    ep = ServerEndpoint()
    body = struct.pack("<HH", 1, 0)
    ev = ep.receive(Header(4, Command.VERSION, 20, 0), body)
    assert isinstance(ev, Rejected) and ev.fatal and ep.state is State.CLOSED


def test_no_reply_commands_get_no_error_reply() -> None:
    ep = ServerEndpoint()
    ev = ep.receive(Header(4, 99, 16, wire.FLAG_NO_REPLY), b"")
    assert isinstance(ev, Rejected) and ev.answer is None


def test_endpoint_matches_dma_replies_by_id_and_drops_strays() -> None:
    ep = ServerEndpoint()
    ep.receive(*split(qemu_version_request()))
    msg_id, raw = ep.dma_read(0x1000, 4)
    header, _ = split(raw)
    assert header.command == Command.DMA_READ and len(raw) == 32
    reply = codec.encode(msg_id, m.DmaReadReply(0x1000, b"abcd"), reply=True)
    ev = ep.receive(*split(reply))
    assert isinstance(ev, ReplyReceived) and ev.reply == m.DmaReadReply(0x1000, b"abcd")
    assert isinstance(ep.receive(*split(reply)), StrayReply)  # answered already
    msg_id, _ = ep.dma_write(0x2000, b"xy")
    err = codec.encode_error(msg_id, Command.DMA_WRITE, wire.EFAULT)
    ev = ep.receive(*split(err))
    assert isinstance(ev, ReplyReceived) and ev.reply is None and ev.errno == wire.EFAULT


def test_too_many_fds_rejected() -> None:
    ep = ServerEndpoint(ServerCaps(max_msg_fds=1))
    ep.receive(*split(qemu_version_request()))
    flags = wire.IRQ_SET_DATA_EVENTFD | wire.IRQ_SET_ACTION_TRIGGER
    raw = codec.encode(2, m.SetIrqs(flags, 0, 0, 2))
    ev = ep.receive(*split(raw), (5, 6))
    assert isinstance(ev, Rejected)
