"""The remote's serve loop: one blocking, single-threaded loop over the mpqemu socket.

What it is: the IO shell that ties the transport (mpqemu_mgmt/remote/transport.py), the
:class:`~mpqemu_mgmt.remote.dispatch.MpqemuDispatcher`, the resamplefd, the device's timers and
the QMP monitor together with one ``poll``. Single-threaded on purpose: the seccomp allowlist
stays small and the model needs no locks (hw/remote runs its message loop as one coroutine, too).

Order inside one turn: run due timers; poll (timeout = next deadline); handle at most one mpqemu
message (the proxy waits for each RET, so there is never more than one), resample events and QMP.

A guest access (PCI_CFGREAD/WRITE, BAR_READ/WRITE read by the transport's fast path) never becomes
a message object: ``Transport.read_request`` returns its command, the dispatcher's specialised
handler for it turns the payload buffer into the RET value, ``Transport.send_ret_value`` sends the
cached frame. Everything else is read, decoded and dispatched through the codec as before.

Hot mode (one syscall fewer per guest access): while the proxy sends each request within
:data:`HOT_GAP` of our previous reply (a guest doing back-to-back accesses), no timer is pending
and the INTx line is low (a resample event then needs no answer: it only drains the counter,
which a later poll still does), the loop skips poll and blocks in the socket read itself, bounded
by SO_RCVTIMEO = :data:`HOT_WAIT`; the other fds (QMP, resamplefd) are looked at with a
zero-timeout poll at least every :data:`HOT_LOOK` seconds, so a heartbeat waits at most that long
while the proxy is busy. When the read times out (the proxy is idle) or the proxy is slower than
HOT_GAP, the loop goes back to poll, as QEMU's own remote does for every message (its main loop's
ppoll, util/main-loop.c). Measured on this project's 2-core host (bench/emulator_config_read.py):
blocking in the read is ~9% faster than poll + read for back-to-back requests (raw client) but ~6%
slower for a proxy that takes ~20 us between reply and request (ProxySim), hence the gap rule.

Adaptive polling (polling.py, ``--poll-us``, on by default): for a short window after each reply
or deferred device work such as a virtio batch (at most 200 us, shrinking to nothing for an idle
guest) the loop tries the socket with MSG_DONTWAIT, calling sched_yield between tries, before it
sleeps in poll or the hot read. It is QEMU's own iothread polling (util/aio-posix.c,
poll-max-ns) applied to one socket. When the proxy's vCPU thread and the remote run on different
CPUs, as in production, a sleeping remote pays a wake-up (an IPI, and on a VM an exit) on every
guest access. Measured with bench/emulator_config_read.py --placement split: the ProxySim round
trip fell from 1.01x stock to 0.46x; bench/virtio_blk.py sequential reads from 0.84x to 1.05x
stock, for more CPU (96% busy vs 57%). On one shared CPU the yield hands the CPU to the client
(0.92x in both cases). While busy (hot or polling) the QMP and resample fds are still looked at
every HOT_LOOK, and every turn while INTx is high.

Exit status: 0 when the proxy closes the socket (or QMP ``quit``), as Contracts 1 and the stock
remote require; 1 after a protocol error (the stream can no longer be trusted; the stock remote
stops too).

What it must not do: send anything unsolicited on the mpqemu socket, or block anywhere but poll,
the hot-mode read (at most :data:`HOT_WAIT`) and the read of a message that has started to arrive.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from mpqemu_mgmt.devices.base import PciDeviceModel
from mpqemu_mgmt.errors import ProtocolError
from mpqemu_mgmt.protocol.messages import Message, SetIrqfd
from mpqemu_mgmt.remote.dispatch import MpqemuDispatcher
from mpqemu_mgmt.remote.irq import EventfdIrq
from mpqemu_mgmt.remote.memory import MappedGuestMemory
from mpqemu_mgmt.remote.polling import DEFAULT_MAX_WINDOW, AdaptivePoll
from mpqemu_mgmt.remote.qmp_server import QmpServer
from mpqemu_mgmt.remote.timers import TimerQueue
from mpqemu_mgmt.remote.transport import Transport, is_disconnect

_IN = select.POLLIN | select.POLLPRI
HOT_WAIT = 0.02
"""Seconds a hot-mode read blocks before the loop falls back to poll (SO_RCVTIMEO)."""
HOT_LOOK = 0.02
"""While hot, the QMP and resample fds are looked at least this often (seconds)."""
HOT_GAP = 12e-6
"""Hot only while the next request follows a reply within this many seconds."""
_DONTWAIT = int(socket.MSG_DONTWAIT)
_NONE = -2  # no request read yet this turn (read_request returns a command or -1)


class Remote:
    """One device model served over one mpqemu socket."""

    def __init__(
        self,
        sock: socket.socket,
        model: PciDeviceModel,
        memory: MappedGuestMemory,
        irq: EventfdIrq,
        timers: TimerQueue,
        *,
        log: Callable[[str], None] | None = None,
        debug: Callable[[str], None] | None = None,
        hot_gap: float = HOT_GAP,
        poll_window: float = DEFAULT_MAX_WINDOW,
    ) -> None:
        self.hot_gap = hot_gap
        self.poll = AdaptivePoll(poll_window, poll_window)
        self.hot_reads = 0  # messages read in hot mode (x-device-status "loop")
        sock.setblocking(True)
        # bounds the hot-mode read; set here, before confinement (setsockopt is not allowed after)
        sec = int(HOT_WAIT)
        sock.setsockopt(
            socket.SOL_SOCKET,
            socket.SO_RCVTIMEO,
            struct.pack("ll", sec, int((HOT_WAIT - sec) * 1_000_000)),
        )
        self.sock = sock
        self.model = model
        self.memory = memory
        self.irq = irq
        self.timers = timers
        self.log = log or (lambda _m: None)
        self.transport = Transport(sock, role="remote")
        self.dispatcher = MpqemuDispatcher(model, memory, irq, self.log, debug)
        self.qmp: QmpServer | None = None

    def attach_qmp(self, listener: socket.socket) -> QmpServer:
        self.qmp = QmpServer(listener, self.device_status, self.log)
        return self.qmp

    def device_status(self) -> dict[str, Any]:
        """The payload of QMP ``x-device-status``."""
        out = dict(self.model.status())
        out.update(
            pid=os.getpid(),
            messages=self.dispatcher.message_counts(),
            errors=self.dispatcher.errors,
            memory={
                "regions": self.memory.regions(),
                "syncs": self.memory.syncs,
                "remaps": self.memory.remaps,
            },
            irq={
                "attached": self.irq.attached,
                "level": self.irq.level,
                "asserts": self.irq.asserts,
                "resamples": self.irq.resamples,
            },
            loop={"hot_reads": self.hot_reads, "poll": self.poll.status()},
        )
        return out

    def _watch_key(self) -> tuple[int | None, int | None]:
        qmp_fd = self.qmp.filenos()[0] if self.qmp is not None else None
        return self.irq.resample_fileno, qmp_fd

    def _on_other(
        self, events: list[tuple[int, int]], sock_fd: int, key: tuple[int | None, int | None]
    ) -> bool:
        """Handle poll events of the resamplefd and QMP; True when QMP asked to quit."""
        for fd, _ev in events:
            if fd == sock_fd:
                continue
            if fd == key[0]:
                self.irq.on_resample()
            elif self.qmp is not None and fd == key[1]:
                # a hung-up client reads as EOF in on_readable and is dropped there
                self.qmp.on_readable(fd)
                if self.qmp.quit_requested:
                    self.qmp.announce_shutdown()
                    return True
        return False

    def run(self) -> int:
        """Serve until the proxy closes the socket (0), QMP quit (0) or a protocol error (1)."""
        sock_fd = self.sock.fileno()
        poller = select.poll()
        poller.register(sock_fd, _IN)
        key: tuple[int | None, int | None] = (None, None)
        timers = self.timers
        irq = self.irq
        transport = self.transport
        read = transport.read_message
        read_request = transport.read_request
        send = transport.send_message
        send_value = transport.send_ret_value
        payload = transport.payload
        dispatch = self.dispatcher.handle
        # one specialised handler per hot command: payload buffer in, RET value out
        fast = self.dispatcher.fast_handlers()
        clock = time.monotonic
        hot_gap = self.hot_gap
        hot_reads = 0
        hot = False
        poll = self.poll
        yield_cpu = os.sched_yield
        looked = active = 0.0  # active: the last reply, or deferred work
        # the watched fds change only with SET_IRQFD (a new resamplefd) or QMP (dis)connections:
        # look them up again only after those, since this loop runs once per guest access
        rekey = True
        try:
            while True:
                pending = bool(timers)
                if pending:
                    if timers.run_due():
                        # deferred device work (a virtio batch) ran and maybe raised INTx: the
                        # guest's next access (its ISR read) follows this, not the last reply
                        active = clock()
                    pending = bool(timers)
                if rekey:
                    rekey = False
                    new_key = self._watch_key()
                    if new_key != key:
                        for fd in key:
                            if fd is not None:
                                poller.unregister(fd)
                        for fd in new_key:
                            if fd is not None:
                                poller.register(fd, _IN)
                        key = new_key
                cmd = _NONE
                # the hot read waits up to HOT_WAIT, so only with INTx low (no resample event
                # to answer); polling lasts at most poll.window, so INTx may be high
                polling = not pending and poll.window and active
                busy = polling or (hot and not pending and not irq.level)
                if busy and key != (None, None):
                    # while busy the loop skips poll: look at QMP and the resamplefd every
                    # HOT_LOOK anyway, so a heartbeat is answered while a guest hammers the
                    # device; with INTx high every turn, so an EOI's resample is not delayed
                    now = clock()
                    if irq.level or now - looked >= HOT_LOOK:
                        looked = now
                        # (the mpqemu socket is in the poller too: it is read below)
                        events = [e for e in poller.poll(0) if e[0] != sock_fd]
                        if events:
                            rekey = True
                            self.hot_reads = hot_reads
                            if self._on_other(events, sock_fd, key):
                                return 0
                            continue  # a new QMP client or resamplefd: poll must watch it
                if polling:
                    # adaptive polling (polling.py): for a short window after a reply (or
                    # deferred work), try the socket without sleeping, yielding the CPU between
                    # tries (a client on the same CPU runs then); a busy guest's next access
                    # comes within it
                    deadline = active + poll.window
                    while True:
                        try:
                            cmd = read_request(_DONTWAIT)
                            break
                        except BlockingIOError:
                            if clock() >= deadline:
                                break
                            yield_cpu()
                    if cmd != _NONE:
                        poll.hit()
                if cmd != _NONE:
                    pass  # polling found it
                elif hot and not pending and not irq.level:
                    try:
                        cmd = read_request()
                    except BlockingIOError:
                        hot = False  # the proxy is idle: wait in poll with every fd
                        self.hot_reads = hot_reads
                        continue
                    hot_reads += 1
                    if active:
                        poll.came_late(clock() - active)
                else:
                    timeout = timers.timeout() if pending else None
                    try:
                        # ms, rounded up (no spinning on a sub-ms deadline), but a timer that
                        # is already due (deferred work queued by the last one) does not wait
                        ms = -1 if timeout is None else int(timeout * 1000) + 1 if timeout else 0
                        events = poller.poll(ms)
                    except InterruptedError:
                        continue
                    ready = False
                    for fd, _ev in events:
                        if fd == sock_fd:
                            ready = True
                        else:
                            rekey = True
                    if rekey:
                        self.hot_reads = hot_reads  # QMP may ask for x-device-status
                        if self._on_other(events, sock_fd, key):
                            return 0
                    if not ready:
                        continue
                    try:
                        cmd = read_request()
                    except BlockingIOError:
                        continue  # readable but nothing to read (spurious wake-up)
                    looked = clock()
                    if active:
                        poll.came_late(looked - active)
                # hot while the proxy sends its next request soon after each reply (a busy
                # guest); a slower proxy is better served from poll (see the module docstring)
                if cmd >= 0:
                    handler = fast.get(cmd)
                    if handler is not None:
                        hot = clock() - active < hot_gap
                        send_value(handler(payload))
                        active = clock()
                        continue
                    msg: Message | None = transport.fast_message(cmd)
                else:
                    # not a fast request: what was read went to the endpoint, the codec decides
                    msg = read()
                if msg is None:
                    return 0
                hot = clock() - active < hot_gap
                if type(msg) is SetIrqfd:
                    rekey = True
                reply = dispatch(msg)
                if reply is not None:
                    send(reply)  # a vanished proxy (EPIPE, ECONNRESET) ends below with 0
                    active = clock()
        except ProtocolError as exc:
            self.log(f"mpqemu protocol error, stopping: {exc}")
            return 1
        except OSError as exc:
            if is_disconnect(exc):
                return 0
            raise
        finally:
            self.transport.close()

    def close(self) -> None:
        self.irq.close()
        self.memory.close()
        if self.qmp is not None:
            self.qmp.close()
