"""A minimal vfio-user *client* for tests, the fuzz campaign and the benchmark.

It plays the part of QEMU's ``vfio-user-pci`` (hw/vfio-user/): VERSION with QEMU's capabilities,
device/region/IRQ info, region reads and writes (optionally posted), DMA_MAP of a memfd or of
in-band memory, SET_IRQS with an eventfd, DEVICE_RESET; and it answers the server's DMA_READ and
DMA_WRITE from its own bytearray when memory is not shared. Blocking, one request at a time.

Test tooling (an IO shell): it must not be imported by the remote or the service.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass, field

from mpqemu_mgmt.errors import InvalidMessage, ProtocolError, TruncatedMessage
from mpqemu_mgmt.protocol.vfio_user import codec, wire
from mpqemu_mgmt.protocol.vfio_user import messages as m
from mpqemu_mgmt.protocol.vfio_user.wire import Header
from mpqemu_mgmt.remote.scm import fds_from_ancillary, send_with_fds

QEMU_CAPABILITIES = {
    "max_msg_fds": 16,
    "max_data_xfer_size": wire.DEFAULT_MAX_DATA_XFER,
    "pgsizes": wire.DEFAULT_PGSIZES,
    "max_dma_maps": wire.DEFAULT_MAX_DMA_MAPS,
    "write_multiple": True,
    "migration": {"pgsize": 4096, "max_bitmap_size": 256 * 1024 * 1024},
}


class ErrorReply(ProtocolError):
    """The server answered with the Error flag; ``errno`` in details."""


@dataclass
class VfioUserClient:
    sock: socket.socket
    #: client memory reachable by DMA_READ/DMA_WRITE (address -> bytearray), for unshared windows
    inband: dict[int, bytearray] = field(default_factory=dict)
    _next: int = 0
    dma_served: int = 0

    # -- framing -------------------------------------------------------------------------------

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise TruncatedMessage("server closed the socket")
            buf += chunk
        return bytes(buf)

    def recv(self) -> tuple[Header, bytes, tuple[int, ...]]:
        data, anc, _flags, _ = self.sock.recvmsg(16, socket.CMSG_SPACE(16 * 4), socket.MSG_CMSG_CLOEXEC)
        fds = fds_from_ancillary(anc)
        if not data:
            raise TruncatedMessage("server closed the socket")
        head = data + self._recv_exact(16 - len(data))
        header = wire.unpack_header(head, wire.max_message_size(wire.MAX_MAX_DATA_XFER))
        return header, self._recv_exact(header.payload_size), tuple(fds)

    def send_raw(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        send_with_fds(self.sock, data, fds)

    def _serve_dma(self, header: Header, payload: bytes) -> None:
        req = codec.decode_server_request(header, payload)
        self.dma_served += 1
        for base, buf in self.inband.items():
            end = base + len(buf)
            if isinstance(req, m.DmaRead) and base <= req.address and req.address + req.count <= end:
                off = req.address - base
                reply = m.DmaReadReply(req.address, bytes(buf[off : off + req.count]))
                self.send_raw(codec.encode(header.msg_id, reply, reply=True))
                return
            if isinstance(req, m.DmaWrite) and base <= req.address and req.address + len(req.data) <= end:
                off = req.address - base
                buf[off : off + len(req.data)] = req.data
                echo = m.DmaWriteReply(req.address, len(req.data))  # as QEMU 11.1 answers
                self.send_raw(codec.encode(header.msg_id, echo, reply=True))
                return
        self.send_raw(codec.encode_error(header.msg_id, header.command, wire.EFAULT))

    def call(self, body: object, fds: tuple[int, ...] = (), *, no_reply: bool = False) -> m.Reply | None:
        """Send a command; serve DMA requests until its reply; raise ErrorReply on an error reply."""
        msg_id = self._next
        self._next = (self._next + 1) & 0xFFFF
        self.send_raw(codec.encode(msg_id, body, no_reply=no_reply), fds)
        if no_reply:
            return None
        command = int(body.command if isinstance(body, m.Empty) else body.COMMAND)  # type: ignore[attr-defined]
        while True:
            header, payload, rfds = self.recv()
            if not header.is_reply:
                self._serve_dma(header, payload)
                continue
            if header.msg_id != msg_id:
                raise ProtocolError("reply out of order", got=header.msg_id, want=msg_id)
            if header.is_error:
                raise ErrorReply("error reply", errno=header.error, command=command)
            try:
                return codec.decode_reply(header, payload, rfds, command)
            except InvalidMessage:
                for fd in rfds:
                    os.close(fd)
                raise

    # -- operations ----------------------------------------------------------------------------

    def handshake(self) -> m.Version:
        reply = self.call(m.Version(0, 0, QEMU_CAPABILITIES))
        assert isinstance(reply, m.Version)
        return reply

    def device_info(self) -> m.DeviceInfo:
        reply = self.call(m.DeviceInfoRequest())
        assert isinstance(reply, m.DeviceInfo)
        return reply

    def region_info(self, index: int) -> m.RegionInfo:
        reply = self.call(m.RegionInfoRequest(index))
        assert isinstance(reply, m.RegionInfo)
        return reply

    def irq_info(self, index: int) -> m.IrqInfo:
        reply = self.call(m.IrqInfoRequest(index))
        assert isinstance(reply, m.IrqInfo)
        return reply

    def read(self, region: int, offset: int, count: int) -> int:
        reply = self.call(m.RegionRead(region, offset, count))
        assert isinstance(reply, m.RegionReadReply)
        return int.from_bytes(reply.data, "little")

    def read_bytes(self, region: int, offset: int, count: int) -> bytes:
        reply = self.call(m.RegionRead(region, offset, count))
        assert isinstance(reply, m.RegionReadReply)
        return reply.data

    def write(self, region: int, offset: int, count: int, value: int, *, posted: bool = False) -> None:
        self.call(m.RegionWrite(region, offset, value.to_bytes(count, "little")), no_reply=posted)

    def config_read(self, offset: int, size: int) -> int:
        return self.read(wire.REGION_CONFIG, offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        self.write(wire.REGION_CONFIG, offset, size, value)

    def map_fd(self, address: int, size: int, fd: int, offset: int = 0) -> None:
        flags = wire.DMA_FLAG_READ | wire.DMA_FLAG_WRITE
        self.call(m.DmaMap(flags, offset, address, size), (fd,))

    def map_inband(self, address: int, size: int) -> bytearray:
        buf = bytearray(size)
        self.inband[address] = buf
        self.call(m.DmaMap(wire.DMA_FLAG_READ | wire.DMA_FLAG_WRITE, 0, address, size))
        return buf

    def unmap(self, address: int, size: int) -> None:
        self.call(m.DmaUnmap(0, address, size))
        self.inband.pop(address, None)

    def set_intx_eventfd(self, fd: int | None) -> None:
        flags = wire.IRQ_SET_DATA_EVENTFD | wire.IRQ_SET_ACTION_TRIGGER
        self.call(m.SetIrqs(flags, wire.IRQ_INTX, 0, 1), () if fd is None else (fd,))

    def unmask_intx(self) -> None:
        self.call(m.SetIrqs(wire.IRQ_SET_DATA_NONE | wire.IRQ_SET_ACTION_UNMASK, wire.IRQ_INTX, 0, 1))

    def reset(self) -> None:
        self.call(m.DeviceReset())

    def pump(self, timeout: float) -> int:
        """Serve server-initiated DMA requests that arrive within ``timeout`` seconds."""
        served = 0
        self.sock.settimeout(timeout)
        try:
            while True:
                header, payload, fds = self.recv()
                for fd in fds:
                    os.close(fd)
                if not header.is_reply:
                    self._serve_dma(header, payload)
                    served += 1
        except (TimeoutError, BlockingIOError):
            pass
        finally:
            self.sock.settimeout(None)
        return served

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
