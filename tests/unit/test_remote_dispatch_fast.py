"""The dispatcher's fast handlers against its general path (``handle(decode(frame))``), on the same frames.

The serve loop answers PCI_CFGREAD/WRITE and BAR_READ/WRITE through
:meth:`~mpqemu_mgmt.remote.dispatch.MpqemuDispatcher.fast_handlers` straight from the payload
buffer; the codec path stays the authority. Two identical models are driven by the same request
sequence, one through each path; every RET value, the errors counted, the message counts and the
models' observable state (config bytes, BAR reads, status) must agree after every step.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpqemu_mgmt.devices import catalogue
from mpqemu_mgmt.devices.base import DeviceHost
from mpqemu_mgmt.protocol import wire
from mpqemu_mgmt.protocol.messages import decode, encode
from mpqemu_mgmt.protocol.wire import Cmd
from mpqemu_mgmt.remote.dispatch import MpqemuDispatcher
from mpqemu_mgmt.remote.irq import EventfdIrq
from mpqemu_mgmt.remote.memory import MappedGuestMemory

MODELS = ("pci-testdev", "edu")
Request = tuple[int, bytes]  # command, payload


def _dispatcher(model: str) -> MpqemuDispatcher:
    memory, irq = MappedGuestMemory(), EventfdIrq()
    return MpqemuDispatcher(catalogue.create(model, DeviceHost(memory=memory, irq=irq)), memory, irq)


def _general(d: MpqemuDispatcher, cmd: int, payload: bytes) -> int:
    """The codec path: the frame decoded, handled, the RET's value."""
    frame = wire.HEADER.pack(cmd, len(payload)) + payload
    msg = decode(cmd, frame[wire.HEADER_SIZE :], [])
    ret = d.handle(msg)
    assert ret is not None and ret.size == 8
    return ret.value


def _state(d: MpqemuDispatcher) -> dict[str, Any]:
    model = d.model
    return {
        "config": bytes(model.config.read(i, 1) for i in range(256)),
        "status": model.status(),
        "errors": d.errors,
        "counts": d.message_counts(),
        "windows": [(w.index, w.base, w.size, w.memory) for w in model.config.windows],
    }


def _run_both(model: str, requests: list[Request]) -> None:
    general, fast = _dispatcher(model), _dispatcher(model)
    handlers = fast.fast_handlers()
    buf = bytearray(wire.MAX_PAYLOAD)
    for i, (cmd, payload) in enumerate(requests):
        buf[: len(payload)] = payload
        want = _general(general, cmd, payload)
        got = handlers[cmd](buf)
        assert got == want, f"request {i}: cmd {cmd} payload {payload.hex()}: fast {got:#x} general {want:#x}"
        assert 0 <= got <= wire.UINT64_MAX
        assert _state(fast) == _state(general), f"request {i}: state differs"


def cfg(cmd: Cmd, addr: int, value: int, length: int) -> Request:
    return int(cmd), wire.PCI_CONF.pack(addr, value, length)


def bar(cmd: Cmd, addr: int, value: int, size: int, memory: bool) -> Request:
    return int(cmd), wire.BAR_ACCESS.pack(addr, value, size, int(memory))


# program BAR0 (memory) at 0xfe000000 and BAR1 (I/O, pci-testdev) at 0xc000, enable decode
SETUP = [
    cfg(Cmd.PCI_CFGWRITE, 0x10, 0xFFFFFFFF, 4),
    cfg(Cmd.PCI_CFGREAD, 0x10, 0, 4),
    cfg(Cmd.PCI_CFGWRITE, 0x10, 0xFE000000, 4),
    cfg(Cmd.PCI_CFGWRITE, 0x14, 0xC001, 4),
    cfg(Cmd.PCI_CFGWRITE, 0x04, 0x7, 2),
]


@pytest.mark.parametrize("model", MODELS)
def test_fixed_sequence_agrees(model: str) -> None:
    reqs = [
        *SETUP,
        cfg(Cmd.PCI_CFGREAD, 0, 0, 4),
        cfg(Cmd.PCI_CFGREAD, 0xFF, 0, 1),
        cfg(Cmd.PCI_CFGREAD, 0xFE, 0, 4),  # runs past 256: the error path
        cfg(Cmd.PCI_CFGREAD, 0, 0, 3),
        cfg(Cmd.PCI_CFGREAD, 0, 0, -1),
        cfg(Cmd.PCI_CFGWRITE, 0x3C, 0xAB, 1),
        cfg(Cmd.PCI_CFGWRITE, 0x104, 1, 4),
        bar(Cmd.BAR_WRITE, 0xFE000000, 1, 1, True),  # pci-testdev: select test 1; edu: ID (ro)
        bar(Cmd.BAR_READ, 0xFE000000, 0, 4, True),
        bar(Cmd.BAR_READ, 0xFE000004, 0, 4, True),
        bar(Cmd.BAR_WRITE, 0xFE000004, 0x12345678, 4, True),
        bar(Cmd.BAR_READ, 0xFE000004, 0, 4, True),
        bar(Cmd.BAR_READ, 0xFE000008, 0, 8, True),
        bar(Cmd.BAR_READ, 0xFE000000, 0, 3, True),  # not a power of two
        bar(Cmd.BAR_READ, 0xFE000000, 0, 16, True),  # too wide
        bar(Cmd.BAR_READ, 0xFD000000, 0, 4, True),  # no BAR there
        bar(Cmd.BAR_WRITE, 0xFD000000, 0, 4, True),
        bar(Cmd.BAR_READ, 0xC000, 0, 1, False),
        bar(Cmd.BAR_WRITE, 0xC000, 0, 1, False),
        bar(Cmd.BAR_READ, 0x80, 0, 2, False),  # unassigned port: all-ones
        bar(Cmd.BAR_WRITE, 0x80, 0, 2, False),
        bar(Cmd.BAR_READ, 0xFFFF, 0, 2, False),  # beyond the 64 KiB I/O space
        cfg(Cmd.PCI_CFGWRITE, 0x04, 0, 2),  # decode off: every BAR access misses now
        bar(Cmd.BAR_READ, 0xFE000000, 0, 4, True),
        bar(Cmd.BAR_READ, 0xC000, 0, 1, False),
    ]
    _run_both(model, reqs)


u32 = st.integers(0, 0xFFFFFFFF)
addr_mem = st.one_of(st.integers(0xFE000000 - 8, 0xFE000000 + 0x1100), st.integers(0, wire.UINT64_MAX))
addr_io = st.one_of(st.integers(0xC000 - 4, 0xC000 + 0x104), st.integers(0, 0x10010))
requests = st.lists(
    st.one_of(
        st.builds(cfg, st.just(Cmd.PCI_CFGREAD), st.integers(0, 0x110), u32, st.integers(-1, 9)),
        st.builds(
            cfg,
            st.just(Cmd.PCI_CFGWRITE),
            st.sampled_from([0x04, 0x05, 0x06, 0x0C, 0x10, 0x14, 0x18, 0x3C, 0x3D, 0x100]),
            u32,
            st.sampled_from([1, 2, 4, 3, 0]),
        ),
        st.builds(
            bar,
            st.just(Cmd.BAR_READ),
            addr_mem,
            st.integers(0, wire.UINT64_MAX),
            st.sampled_from([1, 2, 4, 8, 3, 0, 16]),
            st.just(True),
        ),
        st.builds(
            bar,
            st.just(Cmd.BAR_WRITE),
            addr_mem,
            st.integers(0, wire.UINT64_MAX),
            st.sampled_from([1, 2, 4, 8, 3, 0]),
            st.just(True),
        ),
        st.builds(bar, st.just(Cmd.BAR_READ), addr_io, u32, st.sampled_from([1, 2, 4]), st.just(False)),
        st.builds(bar, st.just(Cmd.BAR_WRITE), addr_io, u32, st.sampled_from([1, 2, 4]), st.just(False)),
    ),
    max_size=40,
)


@pytest.mark.parametrize("model", MODELS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(reqs=requests)
def test_random_sequences_agree(model: str, reqs: list[Request]) -> None:
    _run_both(model, [*SETUP, *reqs])


def test_every_fast_command_has_its_codec_payload_size() -> None:
    """The handlers cover exactly the transport's fast commands that answer a u64 RET."""
    handlers = _dispatcher("pci-testdev").fast_handlers()
    assert set(handlers) == {
        int(Cmd.PCI_CFGREAD),
        int(Cmd.PCI_CFGWRITE),
        int(Cmd.BAR_READ),
        int(Cmd.BAR_WRITE),
    }
    # a frame of each decodes through the codec (the sizes the transport checks are the codec's)
    for cmd, size in ((Cmd.PCI_CFGREAD, 12), (Cmd.BAR_READ, 24)):
        assert len(encode(decode(int(cmd), bytes(size), []))[0]) == wire.HEADER_SIZE + size
