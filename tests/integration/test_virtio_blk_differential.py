"""Differential test: our virtio-blk remote against QEMU 7.2's own, through ProxySim.

Both remotes are real processes on an mpqemu socket: stock ``qemu-system-x86_64 -machine x-remote
-drive file=…,format=raw -device virtio-blk-pci,vectors=0`` and ``python -m mpqemu_mgmt.remote
--device virtio-blk --backing-fd K``. The same Python virtio driver (guest RAM a shared memfd,
kicks by I/O BAR writes, completions from the irqfd eventfd) runs the same request sequences on
both; config space, device registers, status bytes, used lengths, data and the final image
contents are compared.

Known, intended differences (asserted, not skipped): stock is a *transitional* device with modern
virtio capabilities and a 64-bit BAR4, ours is legacy-only (protocol.md §3.1: the 7.2 proxy
mis-probes 64-bit BARs); stock offers GEOMETRY/TOPOLOGY/CONFIG_WCE, ours SIZE_MAX.
"""

from __future__ import annotations

import hashlib
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from mpqemu_mgmt.devices.virtio.constants import (
    BLK_S_IOERR,
    BLK_S_OK,
    BLK_S_UNSUPP,
    BLK_T_FLUSH,
    BLK_T_GET_ID,
    BLK_T_IN,
    BLK_T_OUT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    BlkFeature,
    Feature,
    LegacyReg,
)
from mpqemu_mgmt.testing.virtio_blk_remotes import Attached, attach, builtin_blk, stock_blk
from mpqemu_mgmt.testing.virtio_driver import Completion, Request

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 (7.2) is not installed"
)

IMAGE = 4 << 20
SECTORS = IMAGE // 512
#: features both devices offer; the driver acks only these on both sides
COMMON = (
    1 << BlkFeature.SEG_MAX
    | 1 << BlkFeature.BLK_SIZE
    | 1 << BlkFeature.FLUSH
    | 1 << Feature.NOTIFY_ON_EMPTY
    | 1 << Feature.ANY_LAYOUT
    | 1 << Feature.RING_INDIRECT_DESC
    | 1 << Feature.RING_EVENT_IDX
)


def make_image(path: Path, seed: int = 1) -> Path:
    rnd = random.Random(seed)
    path.write_bytes(rnd.randbytes(IMAGE))
    return path


@dataclass
class Twin:
    stock: Attached
    ours: Attached
    stock_image: Path
    our_image: Path

    def run(self, reqs: list[Request]) -> tuple[list[Completion], list[Completion]]:
        a = self.stock.driver.run([_copy(r) for r in reqs])
        b = self.ours.driver.run([_copy(r) for r in reqs])
        return a, b


def _copy(r: Request) -> Request:
    return Request(r.type, r.sector, r.data, r.read_len, r.seg_size, r.indirect)


@pytest.fixture
def twin(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Twin]:
    readonly = bool(getattr(request, "param", False))
    s_img = make_image(tmp_path / "stock.img")
    o_img = make_image(tmp_path / "ours.img")
    with (
        stock_blk(s_img, workdir=tmp_path, readonly=readonly) as (stock, s_sock),
        builtin_blk(o_img, workdir=tmp_path, readonly=readonly, seccomp="off") as (ours, o_sock),
        attach(s_sock) as s_att,
        attach(o_sock) as o_att,
    ):
        yield Twin(s_att, o_att, s_img, o_img)
        assert stock.alive(), stock.log_text()
        assert ours.alive(), ours.log_text()


def test_config_space_identity(twin: Twin) -> None:
    s, o = twin.stock.probe, twin.ours.probe
    assert (s.vendor_id, s.device_id, s.subsystem_id, s.class_id) == (0x1AF4, 0x1001, 0x0002, 0x0100)
    assert (o.vendor_id, o.device_id, o.subsystem_id, o.class_id) == (
        s.vendor_id,
        s.device_id,
        s.subsystem_id,
        s.class_id,
    )
    assert o.bars[0] == s.bars[0]  # BAR0: 128-byte I/O
    sc, oc = twin.stock.config_space(), twin.ours.config_space()
    same = {
        "vendor/device": slice(0x00, 0x04),
        "command": slice(0x04, 0x06),
        "revision/class": slice(0x08, 0x0C),
        "header type": slice(0x0E, 0x0F),
        "BAR0..3": slice(0x10, 0x20),
        "cardbus": slice(0x28, 0x2C),
        "subsystem": slice(0x2C, 0x30),
        "rom": slice(0x30, 0x34),
        "interrupt pin": slice(0x3D, 0x3E),
    }
    for name, where in same.items():
        assert oc[where] == sc[where], name
    assert oc[0x0B] == 0x01 and oc[0x0A] == 0x00 and oc[0x09] == 0x00  # class 0x010000
    # The intended differences: stock's modern-virtio capability list and 64-bit BAR4.
    assert sc[0x06] & 0x10 and sc[0x34] != 0 and s.bars[1].index == 4
    assert not oc[0x06] & 0x10 and oc[0x34] == 0 and len(o.bars) == 1


def test_registers_and_device_config(twin: Twin) -> None:
    si = twin.stock.driver.init(COMMON)
    oi = twin.ours.driver.init(COMMON)
    assert si.host_features & COMMON == oi.host_features & COMMON == COMMON
    assert si.host_features & (1 << Feature.BAD_FEATURE) and oi.host_features & (1 << Feature.BAD_FEATURE)
    assert si.guest_features == oi.guest_features == COMMON
    assert (si.queue_size, si.capacity, si.seg_max, si.blk_size) == (
        oi.queue_size,
        oi.capacity,
        oi.seg_max,
        oi.blk_size,
    )
    assert oi.capacity == SECTORS
    for att in (twin.stock, twin.ours):
        bus = att.driver.bus
        assert bus.read(LegacyReg.QUEUE_PFN, 4) == att.driver.desc >> 12
        assert bus.read(LegacyReg.STATUS, 1) == 7
        assert bus.read(LegacyReg.QUEUE_SEL, 2) == 0
        bus.write(LegacyReg.QUEUE_SEL, 2, 1)  # a queue that does not exist
    assert [a.driver.bus.read(LegacyReg.QUEUE_NUM, 2) for a in (twin.stock, twin.ours)] == [0, 0]
    # device config bytes both define the same way: capacity, seg_max, blk_size, num_queues
    sc, oc = twin.stock.driver.config_bytes(60), twin.ours.driver.config_bytes(60)
    for where in (slice(0, 8), slice(12, 16), slice(20, 24), slice(34, 36)):
        assert oc[where] == sc[where]
    assert twin.stock.driver.bus.read(LegacyReg.CONFIG + 60, 4) == twin.ours.driver.bus.read(
        LegacyReg.CONFIG + 60, 4
    )


FIXED = [
    Request(BLK_T_IN, 0, read_len=4096),
    Request(BLK_T_OUT, 8, data=b"\x5a" * 8192, seg_size=512),
    Request(BLK_T_IN, 8, read_len=8192, indirect=True),
    Request(BLK_T_FLUSH),
    Request(BLK_T_GET_ID, read_len=20),
    Request(BLK_T_GET_ID, read_len=4),
    Request(BLK_T_IN, SECTORS - 1, read_len=512),  # last sector
    Request(BLK_T_IN, SECTORS - 1, read_len=1024),  # past the end → IOERR
    Request(BLK_T_OUT, SECTORS, data=b"x" * 512),  # past the end → IOERR
    Request(BLK_T_IN, 3, read_len=700),  # not a multiple of 512 → IOERR
    Request(BLK_T_IN, 2**40, read_len=512),
    Request(99, 0, read_len=512),  # unknown → UNSUPP
    Request(BLK_T_FLUSH | BLK_T_OUT),  # dispatch ignores the OUT bit
    Request(BLK_T_GET_ID | BLK_T_OUT, read_len=20),
    Request(BLK_T_IN | 0x80000000, 16, read_len=512),  # BARRIER ignored
    Request(BLK_T_IN, SECTORS, read_len=0),
]


def test_fixed_requests(twin: Twin) -> None:
    twin.stock.driver.init(COMMON)
    twin.ours.driver.init(COMMON)
    for req in FIXED:
        (a,), (b,) = twin.run([req])
        assert a == b, f"{req.type:#x}@{req.sector}: stock={a} ours={b}"
    statuses = [twin.ours.driver.run([_copy(r)])[0].status for r in FIXED]
    assert BLK_S_IOERR in statuses and BLK_S_UNSUPP in statuses and BLK_S_OK in statuses


def test_random_sequences_and_final_image(twin: Twin) -> None:
    """~400 requests in random batches of up to 12 (both directions, splits, indirect, errors)."""
    twin.stock.driver.init(COMMON)
    twin.ours.driver.init(COMMON)
    rnd = random.Random(2026)
    sent = 0
    while sent < 400:
        batch = []
        for _ in range(rnd.randint(1, 12)):
            kind = rnd.choices(["r", "w", "f", "id", "bad", "err"], [40, 40, 5, 3, 2, 10])[0]
            sector = rnd.randrange(SECTORS)
            count = rnd.randint(1, 16)
            seg = rnd.choice([0, 0, 512, 4096, 1536])
            ind = rnd.random() < 0.3
            if kind == "r":
                n = min(count, SECTORS - sector) * 512
                batch.append(Request(BLK_T_IN, sector, read_len=n, seg_size=seg, indirect=ind))
            elif kind == "w":
                n = min(count, SECTORS - sector) * 512
                batch.append(Request(BLK_T_OUT, sector, data=rnd.randbytes(n), seg_size=seg, indirect=ind))
            elif kind == "f":
                batch.append(Request(BLK_T_FLUSH))
            elif kind == "id":
                batch.append(Request(BLK_T_GET_ID, read_len=rnd.randint(1, 40)))
            elif kind == "bad":
                batch.append(Request(rnd.choice([3, 6, 7, 15, 100, 0x7FFF]), sector, read_len=512))
            else:
                batch.append(Request(rnd.choice([BLK_T_IN, BLK_T_OUT]), SECTORS - 1, read_len=1024))
        a, b = twin.run(batch)
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert x == y, f"request {sent + i}: {batch[i].type:#x}@{batch[i].sector} stock={x} ours={y}"
        sent += len(batch)
    assert twin.stock.driver.flush() == twin.ours.driver.flush()
    s = hashlib.sha256(twin.stock_image.read_bytes()).hexdigest()
    o = hashlib.sha256(twin.our_image.read_bytes()).hexdigest()
    assert s == o


@pytest.mark.parametrize("twin", [True], indirect=True, ids=["readonly"])
def test_readonly_backing(twin: Twin) -> None:
    si = twin.stock.driver.init()
    oi = twin.ours.driver.init()
    assert si.host_features & (1 << BlkFeature.RO) and oi.host_features & (1 << BlkFeature.RO)
    twin.stock.driver.init(COMMON | 1 << BlkFeature.RO)
    twin.ours.driver.init(COMMON | 1 << BlkFeature.RO)
    reqs = [
        Request(BLK_T_OUT, 0, data=b"w" * 4096),
        Request(BLK_T_IN, 0, read_len=4096),
        Request(BLK_T_FLUSH),
    ]
    a, b = twin.run(reqs)
    assert a == b
    assert b[0].status == BLK_S_IOERR and b[1].status == BLK_S_OK
    assert (
        twin.stock_image.read_bytes()
        == twin.our_image.read_bytes()
        == make_image(twin.our_image.with_suffix(".ref")).read_bytes()
    )


@pytest.mark.parametrize(
    "chain",
    [
        [(0x0, 16, 0)],  # header only: no status byte
        [(0x0, 16, DESC_F_WRITE)],  # no driver-readable header
        [(0x0, 8, 0), (0x1000, 1, DESC_F_WRITE)],  # header too short
    ],
    ids=["no-status", "no-header", "short-header"],
)
def test_malformed_chain_is_not_completed_and_reset_recovers(
    twin: Twin, chain: list[tuple[int, int, int]]
) -> None:
    """Stock calls virtio_error (device broken); ours also sets NEEDS_RESET. Neither completes it."""
    for att in (twin.stock, twin.ours):
        drv = att.driver
        drv.init(COMMON)
        base = drv.ram.alloc(0x2000, align=4096)
        for i, (off, n, flags) in enumerate(chain):
            more = i + 1 < len(chain)
            drv.put_desc(i, base + off, n, flags | (DESC_F_NEXT if more else 0), i + 1 if more else 0)
        drv.publish(0)
        drv.kick(force=True)
        assert drv.used_idx() == 0
        drv.init(COMMON)
        assert drv.write(0, b"r" * 512).status == BLK_S_OK
    assert twin.stock.driver.status() & 0x3F == twin.ours.driver.status() & 0x3F


def test_device_reset_message_resets_virtio_state(twin: Twin) -> None:
    """MPQEMU DEVICE_RESET (what the proxy sends at machine reset) → virtio_pci_reset on both."""
    for att in (twin.stock, twin.ours):
        drv = att.driver
        drv.init(COMMON)
        assert drv.write(4, b"d" * 1024).status == BLK_S_OK
        att.sim.device_reset()
        bus = drv.bus
        regs = [bus.read(r, n) for r, n in ((LegacyReg.STATUS, 1), (LegacyReg.GUEST_FEATURES, 4),
                                           (LegacyReg.QUEUE_PFN, 4), (LegacyReg.QUEUE_SEL, 2))]  # fmt: skip
        assert regs == [0, 0, 0, 0], regs
        # config space (BARs, command) is left alone: the device still answers at its BAR
        drv.init(COMMON)
        assert drv.read(4, 1024).data == b"d" * 1024
