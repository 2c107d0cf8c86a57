"""Start a virtio-blk remote (ours or stock QEMU's) and attach the Python virtio driver over ProxySim.

For tests and benchmarks only. :func:`builtin_blk` spawns ``python -m mpqemu_mgmt.remote --device
virtio-blk --fd N --backing-fd K`` with the image opened here and passed as an inherited fd (the
remote never opens a file); :func:`stock_blk` spawns ``qemu-system-x86_64 -machine x-remote -drive
file=…,if=none,id=d0,format=raw -device virtio-blk-pci,vectors=0,drive=d0,id=vb0`` (through
:class:`~mpqemu_mgmt.testing.stock_remote.StockRemote`) and waits out its start-up window.
:func:`attach` then does what ``x-pci-proxy-dev`` does at realize — SYNC_SYSMEM of a memfd as guest
RAM, SET_IRQFD, the BAR probe — programs the BARs and returns a ready
:class:`~mpqemu_mgmt.testing.virtio_driver.VirtioBlkDriver`.

It must not be used by production code; the service's launcher lives in ``confine/``.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mpqemu_mgmt.pci import regs
from mpqemu_mgmt.protocol import OwnedFd, SysmemRegion
from mpqemu_mgmt.testing.logged_process import LoggedProcess, on_socketpair
from mpqemu_mgmt.testing.proxysim import ProbeResult, ProxySim, memfd_region
from mpqemu_mgmt.testing.stock_remote import StockRemote, settle
from mpqemu_mgmt.testing.virtio_driver import GuestRam, ProxySimBus, VirtioBlkDriver

IO_BASE = 0xC000
MEM_BASE = 0xFE000000
#: I/O and memory decode (map_bars sets those) plus bus mastering: the device may DMA
COMMAND_IO_MEM_MASTER = regs.COMMAND_IO | regs.COMMAND_MEMORY | regs.COMMAND_MASTER


class BuiltinBlkRemote(LoggedProcess):
    """Our remote serving virtio-blk on an inherited socket with an inherited backing fd.

    A :class:`~mpqemu_mgmt.testing.logged_process.LoggedProcess` (spawn, log, stop, reap) rather
    than a :class:`~mpqemu_mgmt.testing.builtin_remote.BuiltinRemote`: the latter inherits only
    the socket and QMP fds, and the backing fd must be inherited too.
    """

    def __init__(
        self,
        image: Path,
        remote_fd: int,
        *,
        workdir: Path,
        readonly: bool = False,
        seccomp: str = "enforce",
        extra_args: Sequence[str] = (),
        name: str = "builtin-blk",
    ) -> None:
        try:
            backing = os.open(image, os.O_RDONLY if readonly else os.O_RDWR)
        except BaseException:
            # ``remote_fd`` is ours from the call on, as LoggedProcess's pass_fds are.
            os.close(remote_fd)
            raise
        argv = [
            sys.executable, "-m", "mpqemu_mgmt.remote", "--device", "virtio-blk",
            "--fd", str(remote_fd), "--backing-fd", str(backing), "--seccomp", seccomp,
            *(["--readonly"] if readonly else []), *extra_args,
        ]  # fmt: skip
        super().__init__(argv, workdir=workdir, name=name, pass_fds=(remote_fd, backing))


@contextlib.contextmanager
def builtin_blk(
    image: Path, *, workdir: Path, readonly: bool = False, seccomp: str = "enforce",
    extra_args: Sequence[str] = (),
) -> Iterator[tuple[BuiltinBlkRemote, socket.socket]]:
    def spawn(remote_fd: int) -> BuiltinBlkRemote:
        return BuiltinBlkRemote(image, remote_fd, workdir=workdir, readonly=readonly, seccomp=seccomp,
                                extra_args=extra_args)

    # Closing the proxy end is the polite stop (the remote exits 0 on EOF); 2 s as BuiltinRemote.
    with on_socketpair(spawn, grace=2.0) as pair:
        yield pair


@contextlib.contextmanager
def stock_blk(
    image: Path, *, workdir: Path, readonly: bool = False
) -> Iterator[tuple[StockRemote, socket.socket]]:
    drive = f"file={image},if=none,id=d0,format=raw" + (",readonly=on" if readonly else "")
    with StockRemote.pair(
        "virtio-blk-pci,vectors=0,drive=d0,id=vb0",
        workdir=workdir,
        qmp=True,
        extra_args=["-drive", drive],
        name="stock-blk",
    ) as (remote, sock):
        settle(remote)
        yield remote, sock


@dataclass
class Attached:
    """Everything the proxy side holds for one remote: keep it alive while the driver runs."""

    sim: ProxySim
    driver: VirtioBlkDriver
    probe: ProbeResult
    ram: GuestRam
    region: SysmemRegion
    irqfd: OwnedFd
    resample: OwnedFd
    mm: mmap.mmap

    def config_space(self) -> bytes:
        return b"".join(self.sim.config_read(off, 4).to_bytes(4, "little") for off in range(0, 256, 4))

    def close(self) -> None:
        self.driver.ram.release()
        self.mm.close()
        self.region.fd.close()
        self.irqfd.close()
        self.resample.close()


@contextlib.contextmanager
def attach(sock: socket.socket, *, ram_size: int = 32 << 20, timeout: float = 10.0) -> Iterator[Attached]:
    """Realize a proxy on ``sock`` (SYNC_SYSMEM, SET_IRQFD, probe), program BARs, build a driver."""
    sim = ProxySim(sock, timeout=timeout)
    region = memfd_region(ram_size, gpa=0)
    mm = mmap.mmap(region.fd.fileno(), ram_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    irqfd: OwnedFd | None = None
    resample: OwnedFd | None = None
    try:
        sim.sync_sysmem([region])
        irqfd, resample = sim.set_irqfd()
        probe = sim.probe()
        sim.map_bars(base_mem=MEM_BASE, base_io=IO_BASE)
        command = sim.config_read(regs.COMMAND, 2)
        sim.config_write(regs.COMMAND, command | COMMAND_IO_MEM_MASTER, 2)
        ram = GuestRam(mm)
        driver = VirtioBlkDriver(ProxySimBus(sim, irqfd.fileno()), ram, timeout=timeout)
        att = Attached(sim, driver, probe, ram, region, irqfd, resample, mm)
    except BaseException:
        for fd in (irqfd, resample):
            if fd is not None:
                fd.close()
        mm.close()
        region.fd.close()
        raise
    try:
        yield att
    finally:
        att.close()
