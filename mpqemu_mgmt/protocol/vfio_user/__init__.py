"""Sans-IO vfio-user codec: the protocol that supersedes mpqemu (docs/interop/vfio-user.rst).

::

    wire.py      constants, the 16-byte header, frame checks
    messages.py  frozen dataclasses per message, payload layouts and validity rules
    codec.py     whole messages <-> dataclasses (server and client views)
    endpoint.py  the server-role state machine: events in, bytes out

The package is pure: it imports no socket/os/asyncio, never reads or writes a file descriptor and
never closes one. Errors it raises on purpose are mpqemu_mgmt.errors.ProtocolError subclasses
(InvalidMessage with ``errno`` and, for a stream that can no longer be trusted, ``fatal=True``;
TruncatedMessage for a short header).
"""

from mpqemu_mgmt.protocol.vfio_user.wire import Command, Header

__all__ = ["Command", "Header"]
