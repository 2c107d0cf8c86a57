"""Serve one in-tree device model over vfio-user: the dispatcher and the serve loop.

The same models that run behind QEMU 7.2's ``x-pci-proxy-dev`` (pci-testdev, edu, virtio-blk) run
here unchanged, through the transport-neutral API of :mod:`mpqemu_mgmt.devices.base`: the
dispatcher maps vfio-user regions to the model (regions 0-5 are its BARs, addressed by index and
offset, so no address decode is needed; region 7 is its 256-byte config space; ROM and VGA are
empty), DMA windows to its :class:`~mpqemu_mgmt.devices.base.GuestMemory`, and the INTx eventfd to
its :class:`~mpqemu_mgmt.devices.base.IrqLine`.

INTx follows the kernel vfio-pci contract that QEMU's client expects (hw/vfio/pci.c
``vfio_intx_interrupt`` / ``vfio_pci_intx_eoi``): INTx is *automasked* — when the line rises the
server signals the trigger eventfd and masks; the client asserts the guest's pin, and on the next
BAR access (its EOI heuristic) deasserts it and sends SET_IRQS(UNMASK); if the device's line is
still high then, the server signals again. Under TCG this is what gives a Linux guest working
interrupts.

Region writes are answered before they are applied (reply, then write): QEMU's vCPU waits for the
reply holding the BQL, and a device that reacts with DMA by message (DMA_READ/WRITE) needs the
client's main loop, which needs the BQL. Requests are still processed strictly in order, so no
later access can observe the difference.

``serve_vfio_user`` is the single entry used by ``python -m mpqemu_mgmt.remote --transport
vfio-user``. The dispatcher (:class:`VfioUserDevice`) is pure apart from the injected DMA table and
fd closer; the loop (:class:`VfioUserSession`) is the IO shell around it.

What it must not do: change a model for the transport's sake, send anything on the socket but
replies and DMA_READ/DMA_WRITE, create or bind paths (the manager hands over a connected socket),
or keep an fd it did not store (DMA windows and IRQ eventfds are the only ones it adopts).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from mpqemu_mgmt.devices.base import DeviceHost, PciDeviceModel
from mpqemu_mgmt.errors import DmaError, InvalidMessage, MpqemuError, ProtocolError
from mpqemu_mgmt.pci.config import BarKind
from mpqemu_mgmt.protocol.vfio_user import messages as m
from mpqemu_mgmt.protocol.vfio_user import wire
from mpqemu_mgmt.protocol.vfio_user.endpoint import (
    Rejected,
    ReplyReceived,
    RequestReceived,
    ServerCaps,
    ServerEndpoint,
    StrayReply,
)
from mpqemu_mgmt.remote.polling import DEFAULT_MAX_WINDOW, AdaptivePoll
from mpqemu_mgmt.remote.vfio_user_memory import DmaWindows
from mpqemu_mgmt.remote.vfio_user_transport import (
    LoopTimers,
    RawMessage,
    VfioUserTransport,
    close_fds,
    drain_eventfd,
    signal_eventfd,
)

log = logging.getLogger("mpqemu_mgmt.remote.vfio_user")

CONFIG_SIZE = 256
_BAR_ACCESS_SIZES = (1, 2, 4, 8)
_PEEK_NOW = socket.MSG_PEEK | socket.MSG_DONTWAIT


# ------------------------------------------------------------------------------ pure parts


@dataclass
class IntxAutomask:
    """Level-triggered INTx over an edge eventfd, automasked (kernel vfio_intx_handler semantics).

    Each method returns True when the trigger eventfd must be signalled now.
    """

    level: bool = False
    masked: bool = False

    def set_level(self, level: bool) -> bool:
        self.level = level
        if level and not self.masked:
            self.masked = True
            return True
        return False

    def unmask(self) -> bool:
        self.masked = False
        return self.set_level(self.level)

    def mask(self) -> None:
        self.masked = True

    def reset(self) -> None:
        self.level = False
        self.masked = False


@dataclass(frozen=True)
class Region:
    index: int
    size: int
    flags: int
    kind: str  # "bar" | "config" | "none"


def region_table(model: PciDeviceModel) -> tuple[Region, ...]:
    """The nine VFIO PCI regions of ``model``: BARs from its ConfigSpace, then ROM, config, VGA."""
    rw = wire.REGION_FLAG_READ | wire.REGION_FLAG_WRITE
    regions = [Region(i, 0, 0, "none") for i in range(wire.PCI_NUM_REGIONS)]
    for index, spec in model.config.bars.items():
        regions[index] = Region(index, spec.size, rw, "bar")
        if spec.kind is BarKind.MEM64:
            regions[index + 1] = Region(index + 1, 0, 0, "none")  # upper half of a 64-bit BAR
    regions[wire.REGION_CONFIG] = Region(wire.REGION_CONFIG, CONFIG_SIZE, rw, "config")
    return tuple(regions)


def config_pieces(offset: int, count: int) -> list[tuple[int, int]]:
    """Naturally aligned 1/2/4-byte pieces covering a config access (what a PCI core accepts)."""
    pieces = []
    while count > 0:
        n = 4
        while n > 1 and (offset % n or n > count):
            n //= 2
        pieces.append((offset, n))
        offset += n
        count -= n
    return pieces


@dataclass
class Outcome:
    """What the dispatcher decided for one request: a reply body or an errno, then deferred work."""

    reply: Any = None
    errno: int = 0
    after: Callable[[], None] | None = None


Closer = Callable[[int], None]


@dataclass
class IrqFds:
    """Eventfds the client gave for (irq index, action); owned here until replaced or closed."""

    close: Closer
    fds: dict[tuple[int, int], int] = field(default_factory=dict)

    def assign(self, index: int, action: int, fd: int | None) -> None:
        old = self.fds.pop((index, action), None)
        if old is not None:
            self.close(old)
        if fd is not None:
            self.fds[(index, action)] = fd

    def get(self, index: int, action: int) -> int | None:
        return self.fds.get((index, action))

    def close_all(self) -> None:
        for fd in self.fds.values():
            self.close(fd)
        self.fds.clear()


class VfioUserDevice:
    """Dispatch decoded vfio-user requests to one PCI device model."""

    def __init__(
        self,
        model: PciDeviceModel,
        windows: DmaWindows,
        intx: IntxAutomask,
        irq_fds: IrqFds,
        signal: Callable[[int], None],
    ) -> None:
        self.model = model
        self.windows = windows
        self.intx = intx
        self.irq_fds = irq_fds
        self.signal = signal
        self.regions = region_table(model)
        self.has_pin = model.config_read(0x3D, 1) != 0

    # -- the IrqLine the model drives ---------------------------------------------------------

    def set_level(self, level: bool) -> None:
        if self.intx.set_level(level):
            self.fire()

    def fire(self) -> None:
        """Signal the INTx trigger eventfd (if the client gave one)."""
        fd = self.irq_fds.get(wire.IRQ_INTX, wire.IRQ_SET_ACTION_TRIGGER)
        if fd is not None:
            self.signal(fd)

    # -- requests ----------------------------------------------------------------------------

    def handle(self, request: m.Request) -> Outcome:
        """Decide one request. Raises nothing for peer mistakes: they become an errno."""
        try:
            return self._handle(request)
        except InvalidMessage as exc:
            return Outcome(errno=int(exc.details.get("errno", wire.EINVAL)))
        except MpqemuError as exc:
            log.debug("device refused %s: %s", type(request).__name__, exc)
            return Outcome(errno=wire.EINVAL)

    def _handle(self, req: m.Request) -> Outcome:
        if isinstance(req, m.RegionRead):
            return self._region_read(req)
        if isinstance(req, m.RegionWrite):
            return self._region_write(req)
        if isinstance(req, m.RegionWriteMulti):
            return self._write_multi(req)
        if isinstance(req, m.SetIrqs):
            return self._set_irqs(req)
        if isinstance(req, m.DmaMap):
            self.windows.map(req.address, req.size, req.flags, req.offset, req.fd)
            return Outcome(m.Empty(wire.Command.DMA_MAP))
        if isinstance(req, m.DmaUnmap):
            self.windows.unmap(req.address, req.size)
            return Outcome(req)
        if isinstance(req, m.DeviceInfoRequest):
            flags = wire.DEVICE_FLAGS_PCI | wire.DEVICE_FLAGS_RESET
            return Outcome(m.DeviceInfo(flags, wire.PCI_NUM_REGIONS, wire.PCI_NUM_IRQS))
        if isinstance(req, m.RegionInfoRequest):
            if req.index >= len(self.regions):
                return Outcome(errno=wire.EINVAL)
            r = self.regions[req.index]
            return Outcome(m.RegionInfo(r.index, r.flags, r.size, 0))
        if isinstance(req, m.IrqInfoRequest):
            return self._irq_info(req)
        if isinstance(req, m.DeviceReset):
            self.model.reset()
            self.intx.reset()
            return Outcome(m.Empty(wire.Command.DEVICE_RESET))
        if isinstance(req, m.Version):  # the endpoint negotiates; this is its answer
            return Outcome(req)
        return Outcome(errno=wire.ENOTSUP)

    def _region(self, index: int, offset: int, count: int) -> Region:
        if index >= len(self.regions):
            raise InvalidMessage("no such region", errno=wire.EINVAL, region=index)
        r = self.regions[index]
        if r.kind == "none" or count == 0 or offset + count > r.size:
            raise InvalidMessage("access outside the region", errno=wire.EINVAL, region=index)
        if r.kind == "bar" and count not in _BAR_ACCESS_SIZES:
            raise InvalidMessage("BAR access size", errno=wire.EINVAL, count=count)
        return r

    def _region_read(self, req: m.RegionRead) -> Outcome:
        r = self._region(req.region, req.offset, req.count)
        if r.kind == "config":
            data = b"".join(
                (self.model.config_read(off, n) & ((1 << (8 * n)) - 1)).to_bytes(n, "little")
                for off, n in config_pieces(req.offset, req.count)
            )
        else:
            value = self.model.bar_read(r.index, req.offset, req.count)
            data = (value & ((1 << (8 * req.count)) - 1)).to_bytes(req.count, "little")
        return Outcome(m.RegionReadReply(req.region, req.offset, data))

    def _apply_write(self, r: Region, offset: int, data: bytes) -> None:
        if r.kind == "config":
            for off, n in config_pieces(offset, len(data)):
                value = int.from_bytes(data[off - offset : off - offset + n], "little")
                self.model.config_write(off, n, value)
        else:
            self.model.bar_write(r.index, offset, len(data), int.from_bytes(data, "little"))

    def _region_write(self, req: m.RegionWrite) -> Outcome:
        r = self._region(req.region, req.offset, len(req.data))
        reply = m.RegionWriteReply(req.region, req.offset, len(req.data))
        return Outcome(reply, after=lambda: self._guarded_write(r, req.offset, req.data))

    def _guarded_write(self, r: Region, offset: int, data: bytes) -> None:
        try:
            self._apply_write(r, offset, data)
        except MpqemuError as exc:
            log.debug("device refused a write to region %d: %s", r.index, exc)

    def _write_multi(self, req: m.RegionWriteMulti) -> Outcome:
        checked = [(self._region(w.region, w.offset, len(w.data)), w) for w in req.writes]

        def apply() -> None:
            for r, w in checked:
                self._guarded_write(r, w.offset, w.data)

        return Outcome(m.WriteMultiReply(len(checked)), after=apply)

    def _irq_count(self, index: int) -> int:
        if index == wire.IRQ_INTX:
            return 1 if self.has_pin else 0
        if index in (wire.IRQ_ERR, wire.IRQ_REQ):
            return 1
        return 0  # no MSI/MSI-X: the in-tree models are INTx-only (protocol.md §7)

    def _irq_info(self, req: m.IrqInfoRequest) -> Outcome:
        if req.index >= wire.PCI_NUM_IRQS:
            return Outcome(errno=wire.EINVAL)
        flags = wire.IRQ_INFO_EVENTFD
        if req.index == wire.IRQ_INTX:
            flags |= wire.IRQ_INFO_MASKABLE | wire.IRQ_INFO_AUTOMASKED
        elif req.index in (wire.IRQ_MSI, wire.IRQ_MSIX):
            flags |= wire.IRQ_INFO_NORESIZE
        return Outcome(m.IrqInfo(req.index, flags, self._irq_count(req.index)))

    def _set_irqs(self, req: m.SetIrqs) -> Outcome:
        ok = Outcome(m.Empty(wire.Command.DEVICE_SET_IRQS))
        if req.index >= wire.PCI_NUM_IRQS:
            raise InvalidMessage("no such IRQ index", errno=wire.EINVAL)
        total = self._irq_count(req.index)
        if req.data == wire.IRQ_SET_DATA_NONE and req.count == 0:
            # vfio-user.rst: count 0 with DATA_NONE disables every interrupt of the index
            if req.action == wire.IRQ_SET_ACTION_TRIGGER:
                for action in (wire.IRQ_SET_ACTION_TRIGGER, wire.IRQ_SET_ACTION_UNMASK):
                    self.irq_fds.assign(req.index, action, None)
                if req.index == wire.IRQ_INTX:
                    self.intx.masked = False
            return ok
        if req.start + req.count > total:
            raise InvalidMessage("IRQ range beyond the index", errno=wire.EINVAL)
        if req.data == wire.IRQ_SET_DATA_EVENTFD:
            if req.action == wire.IRQ_SET_ACTION_MASK:
                raise InvalidMessage("mask eventfds are not supported", errno=wire.ENOTSUP)
            fd = req.fds[0] if req.fds else None
            self.irq_fds.assign(req.index, req.action, fd)
            if req.index == wire.IRQ_INTX and req.action == wire.IRQ_SET_ACTION_TRIGGER and fd is not None:
                self.intx.masked = False
                self.set_level(self.intx.level)  # a line already high fires on the new fd
            return ok
        if req.data == wire.IRQ_SET_DATA_BOOL and not all(req.bools):
            return ok  # nothing selected (our indexes have one sub-index at most)
        if req.index == wire.IRQ_INTX:
            if req.action == wire.IRQ_SET_ACTION_UNMASK:
                if self.intx.unmask():
                    self.fire()
            elif req.action == wire.IRQ_SET_ACTION_MASK:
                self.intx.mask()
            elif req.action == wire.IRQ_SET_ACTION_TRIGGER:
                self.fire()
        return ok

    def close(self) -> None:
        self.irq_fds.close_all()
        self.windows.clear()


# ------------------------------------------------------------------------------ the IO shell


class _Line:
    """The IrqLine handed to the model: forwards to the dispatcher once it exists."""

    def __init__(self) -> None:
        self.target: VfioUserDevice | None = None
        self.pending = False

    def set_level(self, level: bool) -> None:
        if self.target is None:
            self.pending = level
        else:
            self.target.set_level(level)


ModelSource = str | Callable[[DeviceHost], PciDeviceModel]


class VfioUserSession:
    """One connected client: the endpoint, the transport, the dispatcher and the device's timers."""

    MAX_NESTING = 1  # requests served while waiting for a DMA reply may not wait themselves

    def __init__(
        self,
        sock: socket.socket,
        model: ModelSource,
        *,
        backing: IO[bytes] | None = None,
        readonly: bool = False,
        caps: ServerCaps | None = None,
        poll_window: float = DEFAULT_MAX_WINDOW,
    ) -> None:
        self.endpoint = ServerEndpoint(caps or ServerCaps())
        self.transport = VfioUserTransport(sock, self.endpoint)
        self.timers = LoopTimers()
        self.windows = DmaWindows(self.endpoint.caps.max_dma_maps, self._dma_read, self._dma_write)
        line = _Line()
        host = DeviceHost(
            memory=self.windows,
            irq=line,
            timers=self.timers,
            backing=backing,
            readonly=readonly,
            guest_error=lambda text: log.warning("guest error: %s", text),
        )
        if isinstance(model, str):
            from mpqemu_mgmt.devices import catalogue

            self.model = catalogue.create(model, host)
        else:
            self.model = model(host)
        self.device = VfioUserDevice(
            self.model, self.windows, IntxAutomask(), IrqFds(os.close), signal_eventfd
        )
        line.target = self.device
        if line.pending:
            self.device.set_level(True)
        self._depth = 0
        self.rejected = 0
        self.counts: dict[str, int] = {}
        self.dma_by_message = {"reads": 0, "writes": 0}
        self.qmp: Any = None
        # adaptive busy-polling after each reply, as the mpqemu loop does (remote/polling.py)
        self.poll = AdaptivePoll(poll_window, poll_window)
        self._replied = 0.0

    # -- DMA by message (client memory not shared by fd) --------------------------------------

    def _await_reply(self, msg_id: int) -> ReplyReceived:
        if self._depth > self.MAX_NESTING:
            raise DmaError("nested DMA by message")
        self._depth += 1
        try:
            while True:
                raw = self.transport.recv_message()
                if raw is None:
                    raise DmaError("client closed the socket during DMA")
                event = self.endpoint.receive(raw.header, raw.payload, raw.fds.numbers())
                if isinstance(event, ReplyReceived) and event.msg_id == msg_id:
                    raw.fds.close()
                    return event
                # A vCPU may be waiting on us while its main loop waits for the BQL: serve it.
                self._dispatch(raw, event)
        finally:
            self._depth -= 1

    def _dma_exchange(self, kind: str, gpa: int, build: Callable[[], tuple[int, bytes]]) -> ReplyReceived:
        """Send the DMA_READ/DMA_WRITE that ``build`` encodes, count it, and wait for its reply."""
        try:
            msg_id, raw = build()
        except InvalidMessage as exc:
            raise DmaError(exc.message, gpa=gpa) from exc
        self.transport.send(raw)
        self.dma_by_message[kind] += 1
        return self._await_reply(msg_id)

    def _dma_read(self, gpa: int, length: int) -> bytes:
        event = self._dma_exchange("reads", gpa, lambda: self.endpoint.dma_read(gpa, length))
        if not isinstance(event.reply, m.DmaReadReply):
            raise DmaError(f"DMA_READ refused by the client (errno {event.errno})", gpa=gpa)
        return event.reply.data

    def _dma_write(self, gpa: int, data: bytes) -> None:
        event = self._dma_exchange("writes", gpa, lambda: self.endpoint.dma_write(gpa, data))
        if event.reply is None:
            raise DmaError(f"DMA_WRITE refused by the client (errno {event.errno})", gpa=gpa)

    # -- the loop -------------------------------------------------------------------------------

    def _dispatch(self, raw: RawMessage, event: Any) -> None:
        """Answer one event. Every fd of ``raw`` is closed on the way out unless adopted."""
        with raw.fds:
            self._dispatch_owned(raw, event)

    def _dispatch_owned(self, raw: RawMessage, event: Any) -> None:
        if isinstance(event, Rejected):
            self.rejected += 1
            log.debug("rejected %s: %s", event.command, event.reason)
            if event.answer is not None:
                self.transport.send(event.answer)
            if event.fatal:
                raise ProtocolError(f"vfio-user session ended: {event.reason}")
            return
        if isinstance(event, StrayReply | ReplyReceived):
            return  # a reply to nothing we wait for: dropped (its fds closed by the caller)
        assert isinstance(event, RequestReceived)
        request = event.request
        name = wire.Command(raw.header.command).name
        self.counts[name] = self.counts.get(name, 0) + 1
        adopted: tuple[int, ...] = ()
        if isinstance(request, m.DmaMap | m.SetIrqs):
            # From here the dispatcher owns them: DmaWindows.map closes its fd on every path,
            # IrqFds keeps what it stores; the rest is closed in the finally below.
            adopted = raw.fds.detach_all()
        try:
            outcome = self.device.handle(request)
        finally:
            if isinstance(request, m.SetIrqs):
                kept = set(self.device.irq_fds.fds.values())
                close_fds([fd for fd in adopted if fd not in kept])
        if not event.no_reply:
            if outcome.errno:
                self.transport.send(self.endpoint.error(event.msg_id, raw.header.command, outcome.errno))
            else:
                self.transport.send(self.endpoint.reply(event.msg_id, outcome.reply))
        if outcome.after is not None and not outcome.errno:
            outcome.after()

    def _unmask_fd(self) -> int | None:
        return self.device.irq_fds.get(wire.IRQ_INTX, wire.IRQ_SET_ACTION_UNMASK)

    def attach_qmp(self, listener: socket.socket) -> None:
        """Serve the remote's QMP monitor (heartbeat, x-device-status) from the same loop."""
        from mpqemu_mgmt.remote.qmp_server import QmpServer

        self.qmp = QmpServer(listener, self.device_status, log.debug)

    def device_status(self) -> dict[str, Any]:
        """The payload of QMP ``x-device-status``."""
        out = dict(self.model.status())
        out.update(
            pid=os.getpid(),
            transport="vfio-user",
            messages={"received": self.transport.received, "sent": self.transport.sent, **self.counts},
            errors=self.rejected,
            memory={"windows": self.windows.windows(), "dma_by_message": dict(self.dma_by_message)},
            irq={"level": self.device.intx.level, "masked": self.device.intx.masked},
            loop={"poll": self.poll.status()},
        )
        return out

    def step(self, timeout: float | None = None) -> bool:
        """Serve one wake-up: a message, an unmask eventfd, QMP, or due timers. False when done."""
        wait = self.timers.timeout()
        if timeout is not None:
            wait = timeout if wait is None else min(wait, timeout)
        unmask = self._unmask_fd()
        extra = [] if unmask is None else [unmask]
        qmp_fds = self.qmp.filenos() if self.qmp is not None else []
        may_poll = self._replied and self.poll.window and (wait is None or wait > 0)
        polled = bool(may_poll) and self._poll_socket()
        if polled:
            wait = 0  # a message is there: look at the other fds without sleeping, then read it
        ready = self.transport.wait_readable(wait, (*extra, *qmp_fds))
        if unmask is not None and unmask in ready and drain_eventfd(unmask) and self.device.intx.unmask():
            self.device.fire()
        if self.qmp is not None:
            for fd in qmp_fds:
                if fd in ready:
                    self.qmp.on_readable(fd)
            if self.qmp.quit_requested:
                self.qmp.announce_shutdown()
                return False
        if self.transport.fileno() in ready:
            if self._replied and not polled:
                self.poll.came_late(time.monotonic() - self._replied)
            raw = self.transport.recv_message()
            if raw is None:
                return False
            event = self.endpoint.receive(raw.header, raw.payload, raw.fds.numbers())
            self._dispatch(raw, event)
            self._replied = time.monotonic()
        self.timers.run_due()
        return True

    def _poll_socket(self) -> bool:
        """Try the socket without sleeping until the polling window after the last reply closes
        (MSG_PEEK: the message stays for recv_message); True when something arrived."""
        deadline = self._replied + self.poll.window
        sock = self.transport.sock
        if sock.gettimeout() is not None:
            return False  # CPython would sleep in poll before a recv on a timeout socket
        while True:
            try:
                sock.recv(1, _PEEK_NOW)  # b"" (EOF) counts: recv_message reports it
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                os.sched_yield()
                continue
            except InterruptedError:
                continue
            self.poll.hit()
            return True

    def run(self) -> int:
        """Serve until the client closes the socket (exit status 0)."""
        try:
            while self.step():
                pass
        except OSError as exc:
            if exc.errno not in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN):
                raise
        finally:
            self.close()
        return 0

    def close(self) -> None:
        # vfio-user.rst "Client Disconnection": unmap client memory, close its IRQ fds.
        log.info(
            "vfio-user session ends: %d messages received, %d rejected, DMA by message %d reads %d writes",
            self.transport.received,
            self.rejected,
            self.dma_by_message["reads"],
            self.dma_by_message["writes"],
        )
        self.timers.clear()
        self.device.close()
        self.endpoint.close()
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None


def serve_vfio_user(
    sock: socket.socket,
    model: ModelSource,
    *,
    backing: IO[bytes] | None = None,
    readonly: bool = False,
    caps: ServerCaps | None = None,
) -> int:
    """Serve ``model`` (a catalogue name, or a factory taking a DeviceHost) on the connected ``sock``.

    Returns 0 when the client closes the socket; raises ProtocolError when the stream becomes
    unusable (bad framing, refused version), after releasing every fd and mapping.
    """
    return VfioUserSession(sock, model, backing=backing, readonly=readonly, caps=caps).run()


def main_from_args(args: Any, log_: Any) -> int:
    """``python -m mpqemu_mgmt.remote --transport vfio-user ...`` (called by remote/__main__.py).

    Same order as the mpqemu path: adopt the inherited sockets and backing file, build the model,
    then confine (seccomp last), then serve. 0 when the client closes the socket or QMP ``quit``;
    1 after a protocol error that leaves the stream untrustworthy.
    """

    def inherited(fd: int, what: str, listening: bool) -> socket.socket:
        from mpqemu_mgmt.errors import UsageError

        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise UsageError(f"{what} {fd} is not an open socket: {exc}", fd=fd) from exc
        listens = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or listens != listening:
            sock.detach()
            raise UsageError(f"{what} {fd} is not a {'listening' if listening else 'connected'} "
                             "AF_UNIX SOCK_STREAM socket", fd=fd)
        return sock

    level = getattr(args, "log_level", "warning").upper()
    log.setLevel(getattr(logging, level, logging.WARNING))
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(f"mpqemu-remote[{os.getpid()}] {args.device}: %(message)s"))
        log.addHandler(handler)
        log.propagate = False
    sock = inherited(args.fd, "--fd", False)
    backing = None
    if args.backing_fd is not None:
        backing = os.fdopen(args.backing_fd, "rb" if args.readonly else "r+b", buffering=0)
    session = VfioUserSession(sock, args.device, backing=backing, readonly=args.readonly,
                              poll_window=getattr(args, "poll_us", DEFAULT_MAX_WINDOW * 1e6) * 1e-6)
    if args.qmp_fd is not None:
        session.attach_qmp(inherited(args.qmp_fd, "--qmp-fd", True))
    elif args.qmp is not None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(args.qmp)
        listener.listen(1)
        session.attach_qmp(listener)
    if args.seccomp != "off":
        from mpqemu_mgmt.confine.lockdown import lock_down

        # the launcher's precompiled program (--seccomp-bpf-fd, read by __main__) when there is one
        lock_down(model=args.device, mode=args.seccomp, bpf=getattr(args, "seccomp_bpf", None))
    try:
        return session.run()
    except ProtocolError as exc:
        log_.warning(f"vfio-user protocol error, stopping: {exc}")
        return 1
    finally:
        sock.close()
