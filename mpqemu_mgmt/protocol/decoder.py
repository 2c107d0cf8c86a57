"""Incremental, sans-IO frame decoder: bytes and fds in, complete validated messages out.

The decoder buffers whatever it is fed and cuts frames on the 16-byte header's ``size``. Fds that
arrive with a chunk of bytes belong to the message whose frame contains the chunk's first byte
(the proxy attaches them to the first ``sendmsg`` of a message, mpqemu_msg_send). It also tells a
reader how many bytes complete the current part (:meth:`Decoder.wants`), so the transport can
read header and payload with exact lengths as mpqemu_msg_recv does.

Any error closes every fd the decoder holds and leaves it failed; it must not do IO.
"""

from __future__ import annotations

from collections.abc import Sequence

from mpqemu_mgmt.errors import InvalidMessage, ProtocolError, TooManyFds, TruncatedMessage
from mpqemu_mgmt.protocol import wire
from mpqemu_mgmt.protocol.fds import OwnedFd
from mpqemu_mgmt.protocol.messages import Message, decode


class Decoder:
    """Frames mpqemu messages out of a byte stream with fds attached to chunks."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._consumed = 0  # stream offset of _buf[0]
        # (stream offset of a chunk's first byte, the fds that came with it), oldest first.
        self._marks: list[tuple[int, list[OwnedFd]]] = []
        # stream offsets of chunks whose ancillary data was truncated (MSG_CTRUNC)
        self._ctrunc: set[int] = set()
        self._failed: ProtocolError | None = None

    # -- what the reader should do next ------------------------------------------------------

    def wants(self) -> tuple[int, bool]:
        """``(n, header)``: bytes still missing from the current header (``header`` True) or payload."""
        have = len(self._buf)
        if have < wire.HEADER_SIZE:
            return wire.HEADER_SIZE - have, True
        _, size = wire.HEADER.unpack_from(self._buf)
        return max(0, wire.HEADER_SIZE + size - have), False

    @property
    def at_boundary(self) -> bool:
        """True when no partial message is buffered (an EOF here is a clean close)."""
        return not self._buf and not self._marks and not self._ctrunc

    # -- input ---------------------------------------------------------------------------------

    def feed(self, data: bytes, fds: Sequence[OwnedFd] = (), ctrunc: bool = False) -> None:
        """Buffer ``data``; ``fds`` go with the message that contains ``data``'s first byte.

        ``ctrunc``: the reader's control buffer overflowed (MSG_CTRUNC), so fds were lost; that
        message is refused with :class:`TooManyFds` once it is complete.
        """
        if self._failed is not None:
            for f in fds:
                f.close()
            raise ProtocolError("decoder already failed", cause=str(self._failed))
        offset = self._consumed + len(self._buf)
        if fds:
            self._marks.append((offset, list(fds)))
        if ctrunc:
            self._ctrunc.add(offset)
        self._buf += data

    def next_message(self) -> Message | None:
        """Return the next complete, valid message, or None if more bytes are needed.

        Raises :class:`InvalidMessage`/:class:`TooManyFds` (after closing every held fd) when the
        frame is bad; mirrors the order of mpqemu_msg_recv then mpqemu_msg_valid.
        """
        if self._failed is not None:
            raise self._failed
        if len(self._buf) < wire.HEADER_SIZE:
            return None
        cmd, size = wire.HEADER.unpack_from(self._buf)
        if size > wire.MAX_PAYLOAD:
            # mpqemu_msg_recv refuses an oversized frame before reading its payload; the fd
            # count is only judged once the payload is in, so it is checked in decode().
            exc = InvalidMessage("Invalid size for message", cmd=cmd, size=size)
            self._fail(exc)
            raise exc
        end = wire.HEADER_SIZE + size
        if len(self._buf) < end:
            return None
        payload = bytes(self._buf[wire.HEADER_SIZE : end])
        fds = self._front_fds(self._consumed + end)
        truncated = any(o < self._consumed + end for o in self._ctrunc)
        del self._buf[:end]
        self._consumed += end
        self._marks = [m for m in self._marks if m[0] >= self._consumed]
        self._ctrunc = {o for o in self._ctrunc if o >= self._consumed}
        try:
            if truncated:
                for f in fds:
                    f.close()
                raise TooManyFds(
                    f"ancillary data truncated: more than {wire.SOCKET_MAX_FDS} fds with one message",
                    cmd=cmd,
                    received=len(fds),
                )
            return decode(cmd, payload, fds)
        except ProtocolError as exc:
            self._fail(exc)
            raise

    def feed_eof(self) -> None:
        """The peer closed. Clean at a message boundary; :class:`TruncatedMessage` inside one.

        One exact stock quirk is kept: EOF right after a complete header whose payload has not
        started is a *clean* close. mpqemu_msg_recv reads the payload with
        qio_channel_readv_full_all_eof, which returns 0 without an error when nothing at all was
        read, and the remote's message loop then stops as for a normal EOF (no error, guest
        shutdown cause). The header's fds are closed either way.
        """
        if self._failed is not None:
            return
        if self.at_boundary:
            return
        got = len(self._buf)
        if got == wire.HEADER_SIZE:
            self.close()
            return
        exc = TruncatedMessage(
            "Message header corrupted" if got < wire.HEADER_SIZE else "Unable to read full message",
            buffered=got,
        )
        self._fail(exc)
        raise exc

    def close(self) -> None:
        """Drop buffered bytes and close every held fd."""
        for _, group in self._marks:
            for f in group:
                f.close()
        self._marks = []
        self._ctrunc.clear()
        self._consumed += len(self._buf)
        self._buf.clear()

    def _front_fds(self, end: int) -> list[OwnedFd]:
        """The fds of chunks that started inside the front frame (which ends at ``end``)."""
        return [f for offset, group in self._marks if offset < end for f in group]

    def _fail(self, exc: ProtocolError) -> None:
        self._failed = exc
        self.close()
