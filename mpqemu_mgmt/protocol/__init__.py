"""Sans-IO codec for QEMU 7.2's multi-process ("mpqemu") device protocol.

What is here (all pure; nothing in this package may import ``socket``, ``os`` or ``asyncio``):

* :mod:`.wire` — command numbers (``Cmd``) and the exact x86_64 struct layouts (header ``<i4xQ``).
* :mod:`.fds` — ``OwnedFd`` (closes on close()/GC/exit unless ``.detach()``-ed; the real close
  function is injected) and ``FdBundle``.
* :mod:`.messages` — frozen dataclasses ``SyncSysmem(regions)``, ``PciConfigRead``,
  ``PciConfigWrite``, ``BarRead``, ``BarWrite``, ``SetIrqfd``, ``DeviceReset``, ``Ret``;
  ``encode(msg) -> (bytes, fds)``; ``decode(cmd, payload, fds)`` with the validity rules of
  ``mpqemu_msg_valid`` (hw/remote/mpqemu-link.c).
* :mod:`.decoder` — incremental framing: ``feed(data, fds)``, ``next_message()``, ``wants()``.
* :mod:`.endpoint` — ``RemoteEndpoint`` and ``ProxyEndpoint``, state machines as tables:
  ``receive_data(data, fds) -> [events]``, ``receive_eof()``, ``send(msg) -> (bytes, fds)``.

The IO shell is :mod:`mpqemu_mgmt.remote.transport` (the only recvmsg/sendmsg code)::

    t = Transport(sock, role="remote")   # sock: connected AF_UNIX SOCK_STREAM, blocking
    msg = t.read_message()               # Message, or None on a clean EOF at a message boundary
                                         # raises ProtocolError subclasses (InvalidMessage,
                                         # TruncatedMessage, TooManyFds); fds already closed
    t.send_message(Ret(value))           # remote: only RET, only while a reply is due

A received message owns its fds (``SyncSysmem.regions[i].fd``, ``SetIrqfd.irqfd/resamplefd``):
the consumer adopts them with ``.detach()`` or closes them (``close_message(msg)``).
"""

from mpqemu_mgmt.protocol.endpoint import (
    ConnectionClosed,
    MessageReceived,
    ProxyEndpoint,
    RemoteEndpoint,
    ReplyReceived,
    State,
)
from mpqemu_mgmt.protocol.fds import FdBundle, OwnedFd
from mpqemu_mgmt.protocol.messages import (
    BarRead,
    BarWrite,
    DeviceReset,
    Message,
    PciConfigRead,
    PciConfigWrite,
    Ret,
    SetIrqfd,
    SyncSysmem,
    SysmemRegion,
    close_message,
    decode,
    encode,
    reply_expected,
)
from mpqemu_mgmt.protocol.wire import UINT64_MAX, Cmd

__all__ = [
    "UINT64_MAX",
    "BarRead",
    "BarWrite",
    "Cmd",
    "ConnectionClosed",
    "DeviceReset",
    "FdBundle",
    "Message",
    "MessageReceived",
    "OwnedFd",
    "PciConfigRead",
    "PciConfigWrite",
    "ProxyEndpoint",
    "RemoteEndpoint",
    "ReplyReceived",
    "Ret",
    "SetIrqfd",
    "State",
    "SyncSysmem",
    "SysmemRegion",
    "close_message",
    "decode",
    "encode",
    "reply_expected",
]
