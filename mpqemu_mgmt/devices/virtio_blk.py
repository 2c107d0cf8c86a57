"""virtio-blk as a legacy virtio-pci function (QEMU ``-device virtio-blk-pci,vectors=0``).

What it is: the pure device model that the remote serves as ``--device virtio-blk``. PCI identity
as QEMU 7.2 shows it for a transitional virtio-blk-pci (``query-pci`` on a stock x-remote):
vendor:device 1af4:1001, subsystem 1af4:0002, class 0x010000 (SCSI storage controller),
revision 0, INTA, BAR0 = 128-byte I/O BAR holding the legacy registers plus the 60-byte
``struct virtio_blk_config``. It has no modern (virtio 1.0) capabilities and no 64-bit BAR4: the
7.2 proxy mis-probes 64-bit BARs (protocol.md §3.1), so only the legacy interface is offered.

Requests (hw/block/virtio-blk.c ``virtio_blk_handle_request``): IN, OUT, FLUSH, GET_ID; anything
else completes with VIRTIO_BLK_S_UNSUPP. A request outside the disk or not a multiple of 512
bytes completes with VIRTIO_BLK_S_IOERR; a backend error too. A chain without room for the
header or the status byte breaks the device (NEEDS_RESET), as ``virtio_error`` does.
Features: SIZE_MAX, SEG_MAX, BLK_SIZE, FLUSH, RO (read-only backing) plus the transport's
INDIRECT_DESC, EVENT_IDX, NOTIFY_ON_EMPTY, ANY_LAYOUT.

Data moves between the backend and guest RAM through the zero-copy views that the ring hands
out: the backend reads into / writes from guest memory directly.

What it must not do: IO of its own (only through the :class:`BlockBackend` it is given), open
files, or raise on guest input.
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

from mpqemu_mgmt.devices.base import DeviceHost
from mpqemu_mgmt.devices.function import PciFunction
from mpqemu_mgmt.devices.virtio.blockio import BlockBackend
from mpqemu_mgmt.devices.virtio.constants import (
    BLK_ID_BYTES,
    BLK_OUTHDR_SIZE,
    BLK_S_IOERR,
    BLK_S_OK,
    BLK_S_UNSUPP,
    BLK_T_BARRIER,
    BLK_T_FLUSH,
    BLK_T_GET_ID,
    BLK_T_IN,
    BLK_T_OUT,
    BLK_T_SCSI_CMD,
    SECTOR_SIZE,
    BlkFeature,
)
from mpqemu_mgmt.devices.virtio.iov import iov_discard_front
from mpqemu_mgmt.devices.virtio.legacy_pci import LegacyVirtioPci
from mpqemu_mgmt.devices.virtio.ring import Chain
from mpqemu_mgmt.errors import UsageError, VirtqueueError
from mpqemu_mgmt.pci import BarKind, BarSpec, ConfigSpace

VENDOR_ID = 0x1AF4  # PCI_VENDOR_ID_REDHAT_QUMRANET
DEVICE_ID = 0x1001  # PCI_DEVICE_ID_VIRTIO_BLOCK (transitional)
SUBSYSTEM_ID = 0x0002  # VIRTIO_ID_BLOCK, set by virtio_pci_device_plugged for legacy
CLASS_STORAGE_SCSI = 0x0100  # PCI_CLASS_STORAGE_SCSI, what virtio_blk_pci_class_init sets

QUEUE_SIZE = 256  # virtio-blk queue-size default in 7.2 (``info qtree``)
SEG_MAX = QUEUE_SIZE - 2  # seg-max-adjust=on: queue_size - 2 (virtio_blk_update_config)
SIZE_MAX = 4 << 20  # no limit of ours; advertised because drivers size their segments by it
#: sizeof(struct virtio_blk_config) up to write_zeroes_may_unmap + padding; QEMU 7.2's
#: 128-byte BAR0 (0x14 + 60, rounded up) matches it.
CONFIG_LEN = 60
BAR0_SIZE = 128
#: largest request QEMU accepts (BDRV_REQUEST_MAX_SECTORS)
MAX_REQUEST_SECTORS = (2**31 - 1) >> 9

_OUTHDR = struct.Struct("<IIQ")


def _gather(views: list[memoryview], length: int) -> bytes:
    """The first ``length`` bytes of a scatter list (``iov_to_buf``); shorter if it is."""
    out = bytearray()
    for v in views:
        need = length - len(out)
        if need <= 0:
            break
        out += v[:need]
    return bytes(out)


class _Rw(NamedTuple):
    """An IN or OUT request that passed its checks and waits for the backend."""

    write: bool
    sector: int
    views: list[memoryview]
    size: int
    last: memoryview
    n: int


class _Other(NamedTuple):
    """A request that is not IN/OUT (FLUSH, GET_ID, unknown), served in ring order."""

    kind: int
    chain: Chain
    data_in: list[memoryview]
    last: memoryview
    n: int


#: most iovecs one preadv/pwritev may carry (IOV_MAX), and most bytes one merged call moves
_IOV_MAX = 1024
_MERGE_MAX = 16 << 20


def _front(writable: list[memoryview], last: memoryview, n: int) -> list[memoryview]:
    """The device-writable buffers without the trailing status byte (``iov_discard_back``)."""
    data = writable[:-1]
    if n > 1:
        data.append(last[: n - 1])
    return data


def _scatter(views: list[memoryview], data: bytes) -> None:
    """Copy ``data`` into the front of ``views`` (``iov_from_buf``); truncated to fit."""
    pos = 0
    for v in views:
        if pos >= len(data):
            return
        n = min(v.nbytes, len(data) - pos)
        v[:n] = data[pos : pos + n]
        pos += n


class BlkRequests:
    """The virtio-blk half of the device: features, config and request handling."""

    def __init__(self, backend: BlockBackend, *, serial: str = "") -> None:
        self.backend = backend
        self.serial = serial.encode()[:BLK_ID_BYTES]
        features = (
            1 << BlkFeature.SIZE_MAX
            | 1 << BlkFeature.SEG_MAX
            | 1 << BlkFeature.BLK_SIZE
            | 1 << BlkFeature.FLUSH
        )
        if backend.readonly:
            features |= 1 << BlkFeature.RO
        self.features = features
        self.config_len = CONFIG_LEN
        self._capacity = backend.size // SECTOR_SIZE
        cfg = bytearray(CONFIG_LEN)
        struct.pack_into("<QII", cfg, 0, self._capacity, SIZE_MAX, SEG_MAX)
        struct.pack_into("<I", cfg, 20, SECTOR_SIZE)  # blk_size
        cfg[32] = 1  # wce: the backend caches writes until FLUSH (QEMU: write-cache=auto → on)
        struct.pack_into("<H", cfg, 34, 1)  # num_queues
        self._config = bytes(cfg)
        self.counters = {"in": 0, "out": 0, "flush": 0, "get_id": 0, "ioerr": 0, "unsupp": 0}

    # -- VirtioDeviceLogic -------------------------------------------------------------------

    def config_read(self, offset: int, size: int) -> int:
        return int.from_bytes(self._config[offset : offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        # The only writable field is ``wce`` and only with CONFIG_WCE, which we do not offer.
        return

    def set_features(self, features: int) -> None:
        return

    def reset(self) -> None:
        return

    def handle_chain(self, queue: int, chain: Chain) -> int:
        """Serve one request; mirrors ``virtio_blk_handle_request``."""
        lens, error = self.handle_batch(queue, [chain])
        if error is not None:
            raise error
        return lens[0]

    def handle_batch(self, queue: int, chains: list[Chain]) -> tuple[list[int], VirtqueueError | None]:
        """Serve ``chains`` in ring order; return the used lengths of those served.

        Mirrors ``virtio_blk_handle_vq`` + ``virtio_blk_submit_multireq``: runs of IN (or OUT)
        requests on consecutive sectors become one ``preadv`` (``pwritev``); anything else first
        completes what is pending, so a FLUSH covers every write before it. A malformed chain
        stops the batch there (``virtio_error``): the ones before it are served and the error
        is returned with their lengths.
        """
        lens: list[int] = []
        pending: list[_Rw] = []
        iovs = size = 0
        error: VirtqueueError | None = None
        for chain in chains:
            try:
                req = self._parse(chain, lens)
            except VirtqueueError as exc:
                error = exc
                break
            if req is None:
                continue
            if isinstance(req, _Other):
                # Not a data request: complete what is pending first (virtio_blk_handle_flush
                # submits the queued writes before it flushes), then serve it.
                if pending:
                    self._submit(pending)
                    pending, iovs, size = [], 0, 0
                req.last[req.n - 1] = self._other(req.kind, req.chain, req.data_in)
                continue
            if pending:
                tail = pending[-1]
                if not (
                    tail.write == req.write
                    and tail.sector + tail.size // SECTOR_SIZE == req.sector
                    and iovs + len(req.views) <= _IOV_MAX
                    and size + req.size <= _MERGE_MAX
                ):
                    self._submit(pending)
                    pending, iovs, size = [], 0, 0
            pending.append(req)
            iovs += len(req.views)
            size += req.size
        if pending:
            self._submit(pending)
        return lens, error

    def _parse(self, chain: Chain, lens: list[int]) -> _Rw | _Other | None:
        """Check one chain and record its used length; None if it is already answered."""
        readable, writable = chain.readable, chain.writable
        if not readable or not writable:
            raise VirtqueueError("virtio-blk missing headers")
        first = readable[0]
        if first.nbytes >= BLK_OUTHDR_SIZE:
            rtype, _ioprio, sector = _OUTHDR.unpack_from(first)
        else:
            header = _gather(readable, BLK_OUTHDR_SIZE)
            if len(header) < BLK_OUTHDR_SIZE:
                raise VirtqueueError("virtio-blk request outhdr too short")
            rtype, _ioprio, sector = _OUTHDR.unpack(header)
        # The status byte is the last byte of the last device-writable buffer
        # (struct virtio_blk_inhdr); used.len is every writable byte, status included.
        last = writable[-1]
        n = last.nbytes
        lens.append(chain.writable_len)
        # mirrors the switch in virtio_blk_handle_request: it dispatches on the type without
        # VIRTIO_BLK_T_OUT and VIRTIO_BLK_T_BARRIER, so e.g. FLUSH|OUT is still a flush.
        kind = rtype & ~(BLK_T_OUT | BLK_T_BARRIER)
        if kind != BLK_T_IN:
            return _Other(kind, chain, _front(writable, last, n), last, n)
        write = bool(rtype & BLK_T_OUT)
        if write:
            self.counters["out"] += 1
            views = readable[1:] if first.nbytes == BLK_OUTHDR_SIZE else iov_discard_front(
                readable, BLK_OUTHDR_SIZE
            )
            size = chain.readable_len - BLK_OUTHDR_SIZE
        else:
            self.counters["in"] += 1
            views = _front(writable, last, n)
            size = chain.writable_len - 1
        if not self._range_ok(sector, size) or (write and self.backend.readonly):
            # out of range, or blk_aio_pwritev on a read-only BlockBackend (-EACCES): IOERR
            last[n - 1] = self._ioerr()
            return None
        return _Rw(write, sector, views, size, last, n)

    def _submit(self, group: list[_Rw]) -> None:
        """One backend call for a run of same-direction, back-to-back requests."""
        head = group[0]
        views = head.views if len(group) == 1 else [v for rw in group for v in rw.views]
        try:
            if head.write:
                self.backend.writev(head.sector * SECTOR_SIZE, views)
            else:
                self.backend.readv(head.sector * SECTOR_SIZE, views)
            status = BLK_S_OK
        except OSError:
            # like virtio_blk_rw_complete for a merged request: every member fails
            self.counters["ioerr"] += len(group) - 1
            status = self._ioerr()
        for rw in group:
            rw.last[rw.n - 1] = status

    def _other(self, kind: int, chain: Chain, data_in: list[memoryview]) -> int:
        if kind == BLK_T_FLUSH:
            self.counters["flush"] += 1
            try:
                self.backend.flush()
            except OSError:
                return self._ioerr()
            return BLK_S_OK
        if kind == BLK_T_GET_ID:
            self.counters["get_id"] += 1
            # "terminated by '\0' only when shorter than buffer" (virtio-blk.c GET_ID)
            ident = self.serial + b"\0"
            room = min(sum(v.nbytes for v in data_in), BLK_ID_BYTES)
            _scatter(data_in, ident[:room])
            return BLK_S_OK
        # scsi=off: too few segments → IOERR, else UNSUPP (virtio_blk_handle_scsi_req)
        if kind == BLK_T_SCSI_CMD and (len(chain.readable) < 2 or len(chain.writable) < 3):
            return self._ioerr()
        # DISCARD and WRITE_ZEROES are not offered: UNSUPP, like every other type.
        self.counters["unsupp"] += 1
        return BLK_S_UNSUPP

    def _ioerr(self) -> int:
        self.counters["ioerr"] += 1
        return BLK_S_IOERR

    def _range_ok(self, sector: int, size: int) -> bool:
        # mirrors virtio_blk_sect_range_ok (logical block size 512: no sector_mask)
        nb = size // SECTOR_SIZE
        if size % SECTOR_SIZE or nb > MAX_REQUEST_SECTORS:
            return False
        return sector <= self._capacity and nb <= self._capacity - sector


class VirtioBlk(PciFunction):
    """virtio-blk-pci (legacy interface, INTx) over a :class:`BlockBackend`.

    Built by the catalogue as ``VirtioBlk(host)``: the backend is then the host's backing file
    (``--backing-fd``; ``host.readonly`` for ``--readonly``). Tests pass ``backend=`` directly.
    """

    model = "virtio-blk"

    def __init__(
        self,
        host: DeviceHost,
        *,
        backend: BlockBackend | None = None,
        serial: str = "",
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        if backend is None:
            if host.backing is None:
                raise UsageError("virtio-blk needs a backing file (--backing-fd K)")
            # Imported here so the model stays importable without the IO shell.
            from mpqemu_mgmt.devices.virtio.blockio import FdBlockBackend

            backend = FdBlockBackend(host.backing.fileno(), readonly=host.readonly)
        config = ConfigSpace(
            vendor_id=VENDOR_ID,
            device_id=DEVICE_ID,
            class_code=CLASS_STORAGE_SCSI,
            revision=0,
            subsystem_vendor_id=VENDOR_ID,
            subsystem_id=SUBSYSTEM_ID,
            interrupt_pin=1,
            bars=(BarSpec(0, BAR0_SIZE, BarKind.IO),),
        )
        super().__init__(host, config)
        self.requests = BlkRequests(backend, serial=serial)
        self.transport = LegacyVirtioPci(
            self.requests,
            config,
            self.intx,
            (queue_size,),
            memory=lambda: host.memory,
            on_error=host.guest_error,
            defer=lambda callback: host.timers.call_later(0.0, callback),
        )

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        if bar != 0:
            return (1 << (8 * size)) - 1
        return self.transport.read(offset, size)

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if bar == 0:
            self.transport.write(offset, size, value)

    def reset(self) -> None:
        # The stock remote calls only dc->reset (virtio_pci_reset): virtio state, not config.
        self.transport.reset()

    def status(self) -> dict[str, Any]:
        return {
            **super().status(),
            "capacity_sectors": self.requests.backend.size // SECTOR_SIZE,
            "readonly": self.requests.backend.readonly,
            "counters": dict(self.requests.counters),
            "virtio": self.transport.status_report(),
        }
