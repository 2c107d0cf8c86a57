"""SCM_RIGHTS on a connected AF_UNIX stream socket: the fds out of ``recvmsg``'s ancillary data,
and a whole message out with its fds on the first ``sendmsg``.

Shared by both transports (remote/transport.py for mpqemu, remote/vfio_user_transport.py) and
their test peers. mpqemu_msg_send (hw/remote/mpqemu-link.c) and libvfio-user attach the fds to the
first chunk of a message the same way.
"""

from __future__ import annotations

import array
import socket

FD_SIZE = array.array("i").itemsize


def cmsg_space(max_fds: int) -> int:
    """Ancillary buffer size for ``recvmsg`` that holds ``max_fds`` fds."""
    return socket.CMSG_SPACE(max_fds * FD_SIZE)


def fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """Every fd number in ``recvmsg``'s ancillary data (SCM_RIGHTS), in order; the caller owns them."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % FD_SIZE])
            fds.extend(arr)
    return fds


def send_with_fds(sock: socket.socket, data: bytes, fds: tuple[int, ...] | list[int] = ()) -> None:
    """Write all of ``data`` on a blocking socket, ``fds`` on the first ``sendmsg``; EINTR retried."""
    view = memoryview(data)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    while True:
        try:
            sent = sock.sendmsg([view], anc)
            break
        except InterruptedError:
            continue
    view = view[sent:]
    while view:
        try:
            sent = sock.send(view)
        except InterruptedError:
            continue
        view = view[sent:]
