"""Hostile-input campaign against the remote-role mpqemu endpoint and transport.

    python -m mpqemu_mgmt.testing.fuzz_mpqemu --count 100000 [--seed N]

Each case is a short stream of random and mutated frames (bad commands, sizes, fd counts, fd
kinds, truncated payloads, split headers, extra fds, byte flips) written with real SCM_RIGHTS
into a real socketpair. The receiving side is :class:`~mpqemu_mgmt.remote.transport.Transport` in
the remote role plus a minimal responder that answers every request (bounds-checked config space,
one fake BAR) where stock QEMU would crash or shut down. For every case:

* nothing but :class:`~mpqemu_mgmt.errors.ProtocolError` may escape, and only to end the link;
* the messages processed and the way the link ends ("eof" or "close") must equal what a model of
  stock QEMU 7.2 predicts (mpqemu_msg_recv, mpqemu_msg_valid and the remote message loop in
  hw/remote/mpqemu-link.c and message.c, on top of a model of how AF_UNIX stream sockets hand out
  SCM_RIGHTS), with one deliberate difference: SYNC_SYSMEM with 8 fds is accepted;
* the set of open fds (/proc/self/fd) is the same before and after.

``--target stock`` checks the model itself: semantically safe cases go to a real stock 7.2
x-remote (one process per case), whose RET count and exit cause must match the model.
``--target builtin`` sends the same cases to our real serve loop (``remote.serve.Remote`` with the
pci-testdev model, guest memory and irq handling) in-process; the messages it handled (as a
multiset) and its exit status (0 = eof, 1 = close) must match the same model.

The test suite runs a slice of this (see tests/integration/test_protocol_fuzz.py). Must not be
imported by production code.
"""

from __future__ import annotations

import argparse
import array
import itertools
import os
import random
import signal
import socket
import struct
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mpqemu_mgmt.errors import ProtocolError
from mpqemu_mgmt.protocol import (
    UINT64_MAX,
    BarRead,
    BarWrite,
    DeviceReset,
    Message,
    PciConfigRead,
    PciConfigWrite,
    Ret,
    close_message,
    reply_expected,
    wire,
)
from mpqemu_mgmt.remote.transport import Transport

FD_KINDS = ("memfd", "pipe", "eventfd", "socket", "devnull")
CONFIG_SIZE = 256
FAKE_BAR = (0xFE000000, 0x1000)


@dataclass(frozen=True, slots=True)
class Chunk:
    """Bytes written with one sendmsg, with ``nfds`` copies of an fd of ``kind`` attached."""

    data: bytes
    nfds: int = 0
    kind: str = "memfd"


@dataclass(frozen=True, slots=True)
class Case:
    chunks: tuple[Chunk, ...]
    tags: frozenset[str] = frozenset()

    @property
    def stream(self) -> bytes:
        return b"".join(c.data for c in self.chunks)


@dataclass(frozen=True, slots=True)
class Outcome:
    processed: tuple[int, ...]
    end: str  # "eof" (clean close) or "close" (protocol error ends the link)
    deviation: bool = False  # the model applied our deliberate difference from stock


# ----------------------------------------------------------------------------- generation

_I32 = (-(1 << 31), (1 << 31) - 1)


def _cfg_payload(rng: random.Random, safe: bool = False) -> bytes:
    if safe:
        return struct.pack("<IIi", rng.randrange(253), rng.getrandbits(32), rng.choice([1, 2, 4]))
    addr = rng.choice([0, 2, 4, 0x10, 0x3C, 0xFC, 0xFD, 0xFF, 0x100, 0xFFFFFFFF, rng.getrandbits(32)])
    length = rng.choice([1, 2, 4, 4, 3, 0, 8, -1, -4, _I32[0], _I32[1], rng.randint(*_I32)])
    return struct.pack("<IIi", addr, rng.getrandbits(32), length)


def _bar_payload(rng: random.Random, safe: bool = False) -> bytes:
    if safe:
        # Port I/O inside the 64 KiB I/O space: unassigned ports quietly succeed in stock QEMU,
        # while an unassigned *memory* address makes it exit ("Bad address ... for mem read").
        port = rng.choice([0xC000 + rng.randrange(256), rng.randrange(0xFFF0)])
        size = rng.choice([1, 2, 4, 8, 3, 0, 6, 16])
        return struct.pack("<QQIB3x", port, rng.getrandbits(64), size, 0)
    base = rng.choice([FAKE_BAR[0], FAKE_BAR[0] + rng.randrange(FAKE_BAR[1]), 0xC000, rng.getrandbits(64)])
    size = rng.choice([1, 2, 4, 8, 3, 0, 6, 16, 0xFFFFFFFF, rng.getrandbits(32)])
    memory = rng.choice([0, 1, 1, 2, 0xFF])
    return struct.pack("<QQIB3x", base, rng.getrandbits(64), size, memory)


def _sysmem_payload(rng: random.Random, n: int, safe: bool = False) -> bytes:
    if safe:
        # Every slot mappable from a 4 KiB memfd, so whichever fds arrive, stock mmap succeeds.
        return struct.pack("<8Q8Q8q", *(i << 24 for i in range(8)), *([0x1000] * 8), *([0] * 8))
    gpas = [rng.choice([0, 0x100000, rng.getrandbits(64)]) for _ in range(n)] + [0] * (8 - n)
    sizes = [rng.choice([0x1000, 0, 1 << 62, rng.getrandbits(64)]) for _ in range(n)] + [0] * (8 - n)
    offsets = [rng.choice([0, 0x1000, -1, rng.randint(-(1 << 63), (1 << 63) - 1)]) for _ in range(n)]
    return struct.pack("<8Q8Q8q", *gpas, *sizes, *(offsets + [0] * (8 - n)))


def _frame(rng: random.Random, tags: set[str], safe: bool = False) -> list[Chunk]:
    kind = rng.choice(["sysmem", "cfgread", "cfgwrite", "barread", "barwrite", "irqfd", "reset", "ret"])
    nfds = 0
    if kind == "sysmem":
        nfds = rng.randint(1, 8)
        cmd, payload = 0, _sysmem_payload(rng, nfds, safe)
    elif kind in ("cfgread", "cfgwrite"):
        cmd, payload = (3 if kind == "cfgread" else 2), _cfg_payload(rng, safe)
    elif kind in ("barread", "barwrite"):
        cmd, payload = (5 if kind == "barread" else 4), _bar_payload(rng, safe)
    elif kind == "irqfd":
        cmd, payload, nfds = 6, b"", 2
    elif kind == "reset":
        cmd, payload = 7, b""
    else:
        cmd, payload = 1, struct.pack("<Q", rng.getrandbits(64))
    fd_kind = "eventfd" if kind == "irqfd" else "memfd"
    pad = 0
    size_field: int | None = None
    if rng.random() < 0.12:
        cmd = rng.choice([-1, 8, 9, 0x7FFFFFFF, -(1 << 31), rng.randint(*_I32)])
        tags.add("bad-cmd")
    if rng.random() < 0.08:
        cmd = rng.randrange(8)
        tags.add("swapped-cmd")
    if rng.random() < 0.15:
        nfds = rng.choice([0, 1, 2, 3, 7, 8, 9, 16, 17, 20])
        tags.add("fd-count")
    if rng.random() < 0.2 and not safe:
        fd_kind = rng.choice(FD_KINDS)
        tags.add("fd-kind")
    if safe:
        # Stock QEMU mmaps SYNC_SYSMEM fds and polls SET_IRQFD's resamplefd: give it kinds it
        # can use, so that only protocol-level faults decide where it stops.
        fd_kind = "eventfd" if cmd == 6 else "memfd"
    if rng.random() < 0.1:
        cut = rng.randint(0, len(payload) + 8)
        payload = payload[:cut] if cut <= len(payload) else payload + rng.randbytes(cut - len(payload))
        tags.add("resized")
    if rng.random() < 0.04:
        payload = rng.randbytes(rng.choice([193, 200, 256]))
        tags.add("oversized")
    if rng.random() < 0.05 and not safe:
        size_field = rng.choice([len(payload) + 1, max(0, len(payload) - 1), 193, (1 << 64) - 1,
                                 rng.getrandbits(64), rng.randint(0, 200)])
        tags.add("misframed")
    if rng.random() < 0.2:
        pad = rng.getrandbits(32)
        tags.add("pad")
    header = struct.pack("<iIQ", cmd, pad, len(payload) if size_field is None else size_field)
    data = bytearray(header + payload)
    if rng.random() < 0.05 and not safe:
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        tags.add("bitflip")
    raw = bytes(data)
    if rng.random() < 0.15 and len(raw) > 2:
        # Written in pieces; the fds go with the first, as mpqemu_msg_send does on a short write.
        cuts = sorted(rng.sample(range(1, len(raw)), min(len(raw) - 1, rng.randint(1, 2))))
        bounds = [0, *cuts, len(raw)]
        tags.add("split")
        pieces = [raw[a:b] for a, b in itertools.pairwise(bounds)]
        chunks = [Chunk(pieces[0], nfds, fd_kind)] + [Chunk(p) for p in pieces[1:]]
        if rng.random() < 0.3:
            # Extra fds on a later piece: stock drops them (no control buffer on later reads).
            i = rng.randrange(1, len(chunks))
            chunks[i] = Chunk(chunks[i].data, rng.randint(1, 3), "memfd" if safe else rng.choice(FD_KINDS))
            tags.add("late-fds")
        return chunks
    return [Chunk(raw, nfds, fd_kind)]


def generate(rng: random.Random, safe: bool = False) -> Case:
    """One case. ``safe`` keeps every field inside what stock QEMU survives *semantically* (config
    offsets <= 252, I/O-space BAR accesses, mappable memfds), so a stock remote stops only on
    protocol-level faults; misframing, bit flips and raw noise are left out for the same reason.
    """
    tags: set[str] = set()
    if rng.random() < 0.04 and not safe:
        tags.add("random-bytes")
        blob = Chunk(rng.randbytes(rng.randint(1, 300)), rng.choice([0, 0, 1, 2, 9]))
        return Case((blob,), frozenset(tags))
    chunks: list[Chunk] = []
    for _ in range(rng.randint(1, 4)):
        chunks.extend(_frame(rng, tags, safe))
    if rng.random() < 0.12:
        last = chunks[-1]
        chunks[-1] = Chunk(last.data[: rng.randrange(len(last.data))], last.nfds, last.kind)
        if not chunks[-1].data:
            chunks.pop()
        tags.add("truncated")
    return Case(tuple(c for c in chunks if c.data), frozenset(tags))


# ----------------------------------------------------------------------------- stock model


class _KernelModel:
    """How Linux AF_UNIX SOCK_STREAM hands bytes and SCM_RIGHTS to reads (unix_stream_read_generic).

    A read takes the fds of every skb it touches; it stops at the end of an skb whose fds it
    took. Without a control buffer the fds are discarded. More than ``space`` fds: the rest are
    discarded and MSG_CTRUNC is set.
    """

    def __init__(self, chunks: tuple[Chunk, ...]) -> None:
        self.skbs: list[list[int]] = []  # [start, end, nfds]
        pos = 0
        for c in chunks:
            self.skbs.append([pos, pos + len(c.data), c.nfds])
            pos += len(c.data)
        self.stream = b"".join(c.data for c in chunks)
        self.pos = 0

    def read(self, n: int, control: bool) -> tuple[bytes, int]:
        start = self.pos
        fds = 0
        while self.pos - start < n and self.pos < len(self.stream):
            skb = next(s for s in self.skbs if s[0] <= self.pos < s[1])
            took = skb[2] > 0
            fds += skb[2]
            skb[2] = 0
            self.pos = min(skb[1], start + n)
            if self.pos < skb[1] or took:
                break
        return self.stream[start : self.pos], (fds if control else 0)


def stock_model(case: Case, exact_stock: bool = False) -> Outcome:
    """What stock 7.2's remote does with this byte stream: messages handled, then eof or close.

    Unless ``exact_stock``, SYNC_SYSMEM with 8 fds is accepted (our deliberate difference).
    """
    k = _KernelModel(case.chunks)
    processed: list[int] = []
    deviation = False
    while True:
        head, nfds = k.read(wire.HEADER_SIZE, control=True)
        if not head:
            return Outcome(tuple(processed), "eof", deviation)
        while len(head) < wire.HEADER_SIZE:  # later header reads carry no control buffer
            more, _ = k.read(wire.HEADER_SIZE - len(head), control=False)
            if not more:
                return Outcome(tuple(processed), "close", deviation)
            head += more
        cmd, size = struct.unpack("<i4xQ", head)
        if size > wire.MAX_PAYLOAD:
            return Outcome(tuple(processed), "close", deviation)
        got = 0
        while got < size:
            more, _ = k.read(size - got, control=False)
            if not more:
                # EOF before the first payload byte: qio_channel_readv_full_all_eof returns 0
                # with no error, so the loop ends as on a clean EOF.
                return Outcome(tuple(processed), "eof" if got == 0 else "close", deviation)
            got += len(more)
        nfds = min(nfds, wire.SOCKET_MAX_FDS)  # MSG_CTRUNC beyond the 16-fd control buffer
        if nfds > wire.REMOTE_MAX_FDS:
            return Outcome(tuple(processed), "close", deviation)
        if not 0 <= cmd < wire.CMD_MAX:
            return Outcome(tuple(processed), "close", deviation)
        if nfds >= wire.REMOTE_MAX_FDS:
            if cmd == 0 and size == 192 and not exact_stock:
                deviation = True  # ours accepts SYNC_SYSMEM with 8 regions; stock closes
            else:
                return Outcome(tuple(processed), "close", deviation)
        valid = {
            0: nfds > 0 and size == 192,
            2: size == 12,
            3: size == 12,
            4: size == 24 and nfds == 0,
            5: size == 24 and nfds == 0,
            6: size == 0 and nfds == 2,
        }.get(cmd, True)
        if not valid or cmd == 1:  # RET to the remote: "Unknown command"
            return Outcome(tuple(processed), "close", deviation)
        processed.append(cmd)


# ----------------------------------------------------------------------------- our side


class _FdSource:
    """One open fd per kind, sent as many times as a chunk asks (each arrives as a new fd)."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}
        self._extra: list[int] = []
        self.fds["memfd"] = os.memfd_create("fuzz", os.MFD_CLOEXEC)
        os.ftruncate(self.fds["memfd"], 4096)
        r, w = os.pipe2(os.O_CLOEXEC)
        self.fds["pipe"] = r
        self._extra.append(w)
        self.fds["eventfd"] = os.eventfd(0, os.EFD_CLOEXEC)
        s1, s2 = socket.socketpair()
        self.fds["socket"] = s1.detach()
        self._extra.append(s2.detach())
        self.fds["devnull"] = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def close(self) -> None:
        for fd in [*self.fds.values(), *self._extra]:
            os.close(fd)


class Responder:
    """The smallest honest serve loop: answers every request, never crashes, owns nothing."""

    def __init__(self) -> None:
        self.config = bytearray(CONFIG_SIZE)
        self.config[0:4] = bytes.fromhex("361b0500")

    def answer(self, msg: Message) -> Ret:
        if isinstance(msg, PciConfigRead | PciConfigWrite):
            # Stock: addr + 4 > 256 is refused and the process exits; a negative len aborts it
            # (pci_default_read_config asserts). We answer UINT64_MAX and carry on.
            if msg.length not in (1, 2, 4) or msg.addr + msg.length > CONFIG_SIZE:
                return Ret(UINT64_MAX)
            if isinstance(msg, PciConfigRead):
                return Ret(int.from_bytes(self.config[msg.addr : msg.addr + msg.length], "little"))
            value = msg.value & ((1 << (8 * msg.length)) - 1)
            self.config[msg.addr : msg.addr + msg.length] = value.to_bytes(msg.length, "little")
            return Ret(0)
        if isinstance(msg, BarRead | BarWrite):
            base, size = FAKE_BAR
            ok_size = msg.size in (1, 2, 4, 8)
            if not ok_size or not msg.memory or not base <= msg.addr <= base + size - msg.size:
                return Ret(UINT64_MAX)
            return Ret(0)
        if isinstance(msg, DeviceReset):
            return Ret(0, size=0)
        return Ret(UINT64_MAX)  # pragma: no cover - only requests get here


def run_case(case: Case, source: _FdSource) -> tuple[Outcome, str | None]:
    """Send the case into a fresh socketpair and serve it. Returns (outcome, error class name)."""
    proxy, remote_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    proxy.settimeout(5)
    remote_sock.settimeout(5)
    transport = Transport(remote_sock, role="remote")
    responder = Responder()
    processed: list[int] = []
    error: str | None = None
    try:
        _send_case(case, proxy, source)
        end = "eof"
        try:
            while True:
                msg = transport.read_message()
                if msg is None:
                    break
                processed.append(int(msg.cmd))
                try:
                    if reply_expected(msg):
                        transport.send_message(responder.answer(msg))
                finally:
                    close_message(msg)
        except ProtocolError as exc:
            end = "close"
            error = type(exc).__name__
    finally:
        transport.close()
        proxy.close()
        remote_sock.close()
    return Outcome(tuple(processed), end), error


_CLASS_NAMES = {
    0: "SyncSysmem",
    2: "PciConfigWrite",
    3: "PciConfigRead",
    4: "BarWrite",
    5: "BarRead",
    6: "SetIrqfd",
    7: "DeviceReset",
}


def _send_case(case: Case, proxy: socket.socket, source: _FdSource) -> None:
    for chunk in case.chunks:
        anc = []
        if chunk.nfds:
            fds = array.array("i", [source.fds[chunk.kind]] * chunk.nfds)
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())]
        proxy.sendmsg([chunk.data], anc)
    proxy.shutdown(socket.SHUT_WR)


def run_case_builtin(
    case: Case, source: _FdSource, device: str = "pci-testdev"
) -> tuple[Outcome, str | None]:
    """The same case against our real serve loop (mpqemu_mgmt.remote.serve.Remote) in-process.

    The order of processed messages is not observable from outside, so the outcome carries the
    commands sorted; the caller compares it with the sorted model outcome.
    """
    from mpqemu_mgmt.devices import catalogue
    from mpqemu_mgmt.devices.base import DeviceHost
    from mpqemu_mgmt.remote.irq import EventfdIrq
    from mpqemu_mgmt.remote.memory import MappedGuestMemory
    from mpqemu_mgmt.remote.serve import Remote
    from mpqemu_mgmt.remote.timers import TimerQueue

    proxy, remote_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    logs: list[str] = []
    memory = MappedGuestMemory(logs.append)
    irq = EventfdIrq(logs.append)
    timers = TimerQueue()
    host = DeviceHost(memory=memory, irq=irq, timers=timers, guest_error=logs.append)
    remote = Remote(remote_sock, catalogue.create(device, host), memory, irq, timers, log=logs.append)
    old = signal.signal(signal.SIGALRM, _watchdog)
    try:
        _send_case(case, proxy, source)
        signal.setitimer(signal.ITIMER_REAL, 5.0)
        status = remote.run()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        remote.close()
        proxy.close()
        remote_sock.close()
    counts = remote.dispatcher.message_counts()
    done = sorted(c for name, n in counts.items() for c in [_cmd_of(name)] * n if c is not None)
    return Outcome(tuple(done), "eof" if status == 0 else "close"), None if status == 0 else "exit 1"


_REQUESTS = frozenset({2, 3, 4, 5, 7})
_CASE_IDS = itertools.count()


def run_case_stock(case: Case, source: _FdSource, workdir: Path) -> tuple[int, str, str]:
    """Send the case to a fresh stock ``x-remote`` pci-testdev; return (RETs seen, end, log).

    A stock remote exits after EOF *and* after an error, so "close" is told from "eof" by the
    error it prints (mpqemu_msg_recv and the message loop report every failure but a clean EOF).
    """
    from mpqemu_mgmt.testing.stock_remote import StockRemote

    rets = 0
    name = f"case-{next(_CASE_IDS)}"
    with StockRemote.pair("pci-testdev,id=t0", workdir=workdir, name=name) as (remote, proxy):
        proxy.settimeout(10)
        _send_case(case, proxy, source)
        reader = Transport(proxy, role="proxy")
        try:
            while True:
                frame = reader.read_raw_frame()
                if frame is None:
                    break
                frame[1].close()
                rets += 1
        except ConnectionResetError:
            # It exited with our bytes still unread: queued RETs were all read before this.
            pass
        remote.wait(10)
        log = remote.log_text()
    (workdir / f"{name}.log").unlink()
    errors = [ln for ln in log.splitlines() if ln.startswith("qemu-system") and "terminating" not in ln]
    return rets, ("close" if errors else "eof"), log


def _cmd_of(name: str) -> int | None:
    return next((c for c, n in _CLASS_NAMES.items() if n == name), None)


def _watchdog(signum: int, frame: object) -> None:
    raise TimeoutError("case did not finish within 5 s")


# ----------------------------------------------------------------------------- campaign


@dataclass
class Report:
    count: int = 0
    failures: list[str] = field(default_factory=list)
    ends: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    tags: Counter[str] = field(default_factory=Counter)
    processed: Counter[str] = field(default_factory=Counter)
    deviations: int = 0
    fd_leaks: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [
            f"cases: {self.count}  failures: {len(self.failures)}  fd leaks: {self.fd_leaks}  "
            f"time: {self.seconds:.1f} s",
            f"ends: {dict(self.ends)}",
            f"errors: {dict(self.errors)}",
            f"messages served: {sum(self.processed.values())} {dict(self.processed)}",
            f"deliberate deviations (SYNC_SYSMEM with 8 fds accepted): {self.deviations}",
            f"mutations: {dict(sorted(self.tags.items()))}",
        ]
        lines += [f"FAIL {f}" for f in self.failures[:20]]
        return "\n".join(lines)


def _fd_set() -> frozenset[str]:
    return frozenset(os.listdir("/proc/self/fd"))


def check_stock_case(case: Case, source: _FdSource, report: Report, workdir: Path) -> None:
    """Validate the model itself against the installed stock QEMU 7.2 (no deviation applied)."""
    expected = stock_model(case, exact_stock=True)
    want_rets = sum(1 for c in expected.processed if c in _REQUESTS)
    try:
        rets, end, log = run_case_stock(case, source, workdir)
    except Exception as exc:
        report.failures.append(f"stock run failed: {type(exc).__name__}: {exc} for {case!r}")
        return
    if (rets, end) != (want_rets, expected.end):
        report.failures.append(
            f"stock gave {rets} RETs/{end}, model {want_rets}/{expected.end} for {case!r}; "
            f"log: {log[-300:]!r}"
        )
    report.count += 1
    report.ends[end] += 1
    report.tags.update(case.tags)
    report.processed.update(wire.Cmd(c).name for c in expected.processed)


def check_case(case: Case, source: _FdSource, report: Report, target: str = "endpoint") -> None:
    before = _fd_set()
    expected = stock_model(case)
    if target == "builtin":
        expected = Outcome(tuple(sorted(expected.processed)), expected.end, expected.deviation)
    try:
        got, error = run_case_builtin(case, source) if target == "builtin" else run_case(case, source)
    except Exception as exc:  # the point of the campaign: nothing else may escape
        report.failures.append(f"escaped {type(exc).__name__}: {exc} in {case!r}")
        return
    after = _fd_set()
    # os.listdir's own directory fd is gone again by now; any difference is a leak.
    if after != before:
        report.fd_leaks += 1
        report.failures.append(f"fd leak {sorted(after ^ before)} in {case!r}")
    if (got.processed, got.end) != (expected.processed, expected.end):
        report.failures.append(f"ours {got} != stock model {expected} for {case!r}")
    report.count += 1
    report.ends[got.end] += 1
    if error:
        report.errors[error] += 1
    report.tags.update(case.tags)
    report.processed.update(wire.Cmd(c).name for c in got.processed)
    report.deviations += expected.deviation


def campaign(
    count: int, seed: int = 0, progress: Callable[[int], None] | None = None, target: str = "endpoint"
) -> Report:
    rng = random.Random(seed)
    report = Report()
    source = _FdSource()
    start = time.monotonic()
    tmp = tempfile.TemporaryDirectory(prefix="mpqemu-fuzz-") if target == "stock" else None
    try:
        for i in range(count):
            if tmp is not None:
                check_stock_case(generate(rng, safe=True), source, report, Path(tmp.name))
                continue
            check_case(generate(rng), source, report, target)
            if progress is not None and (i + 1) % 10000 == 0:
                progress(i + 1)
    finally:
        source.close()
        if tmp is not None:
            tmp.cleanup()
    report.seconds = time.monotonic() - start
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m mpqemu_mgmt.testing.fuzz_mpqemu", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=20_250_701)
    ap.add_argument(
        "--target",
        choices=("endpoint", "builtin", "stock"),
        default="endpoint",
        help="endpoint: transport + remote endpoint + minimal responder (default); "
        "builtin: our real serve loop (remote.serve.Remote) with the pci-testdev model, in-process; "
        "stock: validate the model against stock QEMU 7.2 x-remote (semantically safe cases, "
        "one process per case: use a few hundred)",
    )
    args = ap.parse_args(argv)
    before = _fd_set()
    print(f"target: {args.target}  seed: {args.seed}")
    report = campaign(
        args.count,
        args.seed,
        lambda n: print(f"... {n} cases", file=sys.stderr, flush=True),
        args.target,
    )
    leaked_overall = sorted(_fd_set() - before)
    print(report.summary())
    print(f"open fds before/after the whole campaign equal: {not leaked_overall}")
    ok = not report.failures and not leaked_overall
    print("RESULT: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
