"""Sans-IO endpoint state machines for both ends of an mpqemu link, written as transition tables.

mpqemu has no message ids and no pipelining: the proxy takes its ``io_mutex``, sends one request,
then blocks for the RET (mpqemu_msg_send_and_await_reply); the stock remote handles one message at
a time and answers requests only (hw/remote/message.c). So:

* the proxy role may have at most one request outstanding, and a message arriving while nothing is
  outstanding is unsolicited, hence a protocol error;
* the remote role may send RET only while a reply is due, never anything unsolicited, and it does
  not hand out the next message until the reply to the previous request has been sent.

``receive_data(data, fds) -> [events]``; ``receive_eof() -> [events]``; ``send(msg) -> (bytes,
fds)``; ``next_events()`` after a reply releases messages already buffered. Errors raise
:class:`~mpqemu_mgmt.errors.ProtocolError` subclasses after closing every held fd, and leave the
endpoint FAILED. The endpoint never acts by itself and must not do IO.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from mpqemu_mgmt.errors import InvalidMessage, ProtocolError
from mpqemu_mgmt.protocol.decoder import Decoder
from mpqemu_mgmt.protocol.fds import OwnedFd
from mpqemu_mgmt.protocol.messages import (
    Message,
    Ret,
    close_message,
    encode,
    reply_expected,
)
from mpqemu_mgmt.protocol.wire import Cmd


class State(enum.Enum):
    IDLE = "idle"
    REPLY_DUE = "reply-due"  # remote role: a request was handed out, its RET not yet sent
    AWAITING_REPLY = "awaiting-reply"  # proxy role: a request was sent, its RET not yet received
    CLOSED = "closed"
    FAILED = "failed"


class Ev(enum.Enum):
    """What happened, as a table key."""

    SEND_REQUEST = "send-request"  # CFGREAD/CFGWRITE/BAR_READ/BAR_WRITE/DEVICE_RESET
    SEND_NOTICE = "send-notice"  # SYNC_SYSMEM/SET_IRQFD
    SEND_RET = "send-ret"
    RECV_REQUEST = "recv-request"
    RECV_NOTICE = "recv-notice"
    RECV_RET = "recv-ret"
    RECV_EOF = "recv-eof"


# Transition tables: (state, event) -> next state. A missing key is a protocol error.
REMOTE_TABLE: Final[dict[tuple[State, Ev], State]] = {
    (State.IDLE, Ev.RECV_REQUEST): State.REPLY_DUE,
    (State.IDLE, Ev.RECV_NOTICE): State.IDLE,
    (State.IDLE, Ev.RECV_EOF): State.CLOSED,
    (State.REPLY_DUE, Ev.SEND_RET): State.IDLE,
    # The proxy may close while we are answering (unplug); the RET write will then fail.
    (State.REPLY_DUE, Ev.RECV_EOF): State.CLOSED,
}

PROXY_TABLE: Final[dict[tuple[State, Ev], State]] = {
    (State.IDLE, Ev.SEND_REQUEST): State.AWAITING_REPLY,
    (State.IDLE, Ev.SEND_NOTICE): State.IDLE,
    (State.AWAITING_REPLY, Ev.RECV_RET): State.IDLE,
    (State.IDLE, Ev.RECV_EOF): State.CLOSED,
    (State.AWAITING_REPLY, Ev.RECV_EOF): State.CLOSED,
}


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A valid message for this role. The receiver owns its fds (adopt or close them)."""

    message: Message
    reply_expected: bool


@dataclass(frozen=True, slots=True)
class ReplyReceived:
    """Proxy role: the RET answering the request whose command was ``request``."""

    reply: Ret
    request: Cmd


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed at a message boundary. ``pending`` is the unanswered request, if any."""

    pending: Cmd | None = None


Event = MessageReceived | ReplyReceived | ConnectionClosed


class _Endpoint:
    table: dict[tuple[State, Ev], State]
    role: str

    def __init__(self) -> None:
        self.state = State.IDLE
        self._decoder = Decoder()
        self._pending: Cmd | None = None

    def wants(self) -> tuple[int, bool]:
        """Bytes the transport should read next and whether they start a header (may carry fds)."""
        return self._decoder.wants()

    def _step(self, ev: Ev, what: str) -> None:
        nxt = self.table.get((self.state, ev))
        if nxt is None:
            err = ProtocolError(
                f"{self.role}: {what} not allowed in state {self.state.value}",
                role=self.role,
                state=self.state.value,
                event=ev.value,
            )
            self._fail()
            raise err
        self.state = nxt

    def _fail(self) -> None:
        self.state = State.FAILED
        self._decoder.close()

    def close(self) -> None:
        """Forget buffered input and close every fd not yet handed out."""
        self._decoder.close()
        if self.state is not State.FAILED:
            self.state = State.CLOSED

    def receive_data(self, data: bytes, fds: Sequence[OwnedFd] = (), ctrunc: bool = False) -> list[Event]:
        """Feed bytes (and the fds that came with them; ``ctrunc`` if some were lost)."""
        if self.state in (State.CLOSED, State.FAILED):
            for f in fds:
                f.close()
            raise ProtocolError(f"{self.role}: data after the link {self.state.value}", role=self.role)
        try:
            self._decoder.feed(data, fds, ctrunc)
        except ProtocolError:
            self._fail()
            raise
        return self.next_events()

    def receive_eof(self) -> list[Event]:
        if self.state in (State.CLOSED, State.FAILED):
            return []
        try:
            self._decoder.feed_eof()
        except ProtocolError:
            self._fail()
            raise
        pending = self._pending
        self._step(Ev.RECV_EOF, "EOF")
        self._pending = None
        return [ConnectionClosed(pending)]

    def next_events(self) -> list[Event]:
        """Decode what is buffered, as far as the state allows."""
        events: list[Event] = []
        while self._ready_for_input():
            try:
                msg = self._decoder.next_message()
            except ProtocolError:
                self._fail()
                raise
            if msg is None:
                break
            try:
                events.append(self._on_message(msg))
            except BaseException:
                close_message(msg)
                raise
        return events

    def _ready_for_input(self) -> bool:
        raise NotImplementedError

    def _on_message(self, msg: Message) -> Event:
        raise NotImplementedError


class RemoteEndpoint(_Endpoint):
    """The device side (what x-remote is): receives requests and notices, sends only RET."""

    table = REMOTE_TABLE
    role = "remote"

    def _ready_for_input(self) -> bool:
        # One request at a time: later messages stay buffered until its RET is sent.
        return self.state is State.IDLE

    def _on_message(self, msg: Message) -> Event:
        if isinstance(msg, Ret):
            # The stock remote's message loop: "Unknown command (1) received for device".
            self._fail()
            raise InvalidMessage("Unknown command (1): RET sent to the remote", cmd=int(Cmd.RET))
        expected = reply_expected(msg)
        self._step(Ev.RECV_REQUEST if expected else Ev.RECV_NOTICE, f"receiving {msg.cmd.name}")
        if expected:
            self._pending = msg.cmd
        return MessageReceived(msg, expected)

    def send(self, msg: Message) -> tuple[bytes, tuple[int, ...]]:
        """Encode the RET for the outstanding request. Anything else is refused (never unsolicited)."""
        if not isinstance(msg, Ret):
            self._fail()
            raise ProtocolError(f"remote: may only send RET, not {msg.cmd.name}", role=self.role)
        self._step(Ev.SEND_RET, "sending RET")
        self._pending = None
        return encode(msg)

    @property
    def pending_request(self) -> Cmd | None:
        return self._pending


class ProxyEndpoint(_Endpoint):
    """The VMM side (what x-pci-proxy-dev is): one request outstanding at most."""

    table = PROXY_TABLE
    role = "proxy"

    def _ready_for_input(self) -> bool:
        # Everything that arrives is decoded, so unsolicited traffic is caught as soon as it shows.
        return self.state in (State.IDLE, State.AWAITING_REPLY)

    def _on_message(self, msg: Message) -> Event:
        if not isinstance(msg, Ret):
            # mpqemu_msg_send_and_await_reply: "ERROR: Invalid reply received for command %d".
            self._fail()
            raise InvalidMessage(
                f"invalid reply {msg.cmd.name} for command {self._pending}", cmd=int(msg.cmd)
            )
        if self.state is not State.AWAITING_REPLY:
            self._fail()
            raise ProtocolError("proxy: unsolicited RET (no request outstanding)", role=self.role)
        request = self._pending
        assert request is not None
        self._step(Ev.RECV_RET, "receiving RET")
        self._pending = None
        return ReplyReceived(msg, request)

    def send(self, msg: Message) -> tuple[bytes, tuple[int, ...]]:
        if isinstance(msg, Ret):
            self._fail()
            raise ProtocolError("proxy: never sends RET", role=self.role)
        expected = reply_expected(msg)
        self._step(Ev.SEND_REQUEST if expected else Ev.SEND_NOTICE, f"sending {msg.cmd.name}")
        if expected:
            self._pending = msg.cmd
        return encode(msg)

    @property
    def awaiting(self) -> Cmd | None:
        return self._pending
