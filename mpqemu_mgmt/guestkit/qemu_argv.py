"""The main QEMU's command line for a test-guest boot, and reading the guest's verdict. Pure.

:func:`qemu_argv` turns a :class:`BootSpec` into argv: direct kernel boot under TCG by default,
guest RAM in a shared memfd (the remote maps it from SYNC_SYSMEM fds, hw/remote/proxy-memory-listener.c),
the serial console on stdout, ``x-pci-proxy-dev`` devices on fds the caller already holds, and an
optional prefix (bwrap for the QEMU 11.1 root). :func:`parse_status` finds the marker line that
``/init`` prints. This module must not spawn processes or touch fds.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mpqemu_mgmt.errors import GuestKitError
from mpqemu_mgmt.guestkit.initramfs import MARKER, NONCE_PARAM

DEFAULT_QEMU = "qemu-system-x86_64"
# console=ttyS0 for the transcript; quiet keeps the kernel's chatter (and TCG time spent printing it)
# out; panic=-1 with -no-reboot turns a guest panic into a QEMU exit instead of a hang. The rest trim
# TCG boot work (measured: QEMU CPU time per boot 2.1 s -> 1.8 s): no TSC watchdog/timer check, no
# crypto self-tests, one 8250 port instead of probing four.
BASE_APPEND = ("console=ttyS0", "quiet", "panic=-1", "tsc=reliable", "no_timer_check",
               "cryptomgr.notests", "8250.nr_uarts=1")
_ID_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ProxyDevice:
    """``-device x-pci-proxy-dev,id=<id>,fd=<fd>``: ``fd`` is a connected socket the caller owns.

    The property is ``fd`` (hw/remote/proxy.c ``proxy_properties``), not the ``socket=`` of the
    7.2 user docs.
    """

    id: str
    fd: int


@dataclass(frozen=True)
class BootSpec:
    kernel: Path
    initrd: Path
    memory_mib: int = 256
    machine: str = "pc"
    accel: str = "tcg"
    smp: int = 1
    append: Sequence[str] = ()
    proxies: Sequence[ProxyDevice] = ()
    devices: Sequence[str] = ()
    extra_args: Sequence[str] = ()
    qmp_socket: Path | None = None
    qemu_binary: str = DEFAULT_QEMU
    qemu_argv_prefix: Sequence[str] = field(default_factory=tuple)

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return tuple(p.fd for p in self.proxies)


def kernel_cmdline(spec: BootSpec, nonce: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9]+", nonce):
        raise GuestKitError("nonce must be alphanumeric", nonce=nonce)
    return " ".join((*BASE_APPEND, *spec.append, f"{NONCE_PARAM}={nonce}"))


def qemu_argv(spec: BootSpec, nonce: str) -> list[str]:
    """The full argv (prefix included) for one boot with marker nonce ``nonce``."""
    if spec.memory_mib <= 0:
        raise GuestKitError("memory must be positive", memory_mib=spec.memory_mib)
    for proxy in spec.proxies:
        if not _ID_RE.match(proxy.id) or proxy.fd < 0:
            raise GuestKitError("bad proxy device", id=proxy.id, fd=proxy.fd)
    argv = [
        *spec.qemu_argv_prefix, spec.qemu_binary,
        "-nodefaults", "-no-user-config", "-no-reboot",
        "-display", "none",
        "-accel", spec.accel,
        # x-pci-proxy-dev needs fd-backed, shared guest RAM (protocol.md §3.2).
        "-object", f"memory-backend-memfd,id=mem,size={spec.memory_mib}M,share=on",
        "-machine", f"{spec.machine},memory-backend=mem",
        "-m", f"{spec.memory_mib}M",
        "-smp", str(spec.smp),
        "-chardev", "stdio,id=serial0,signal=off",
        "-serial", "chardev:serial0",
        "-kernel", str(spec.kernel),
        "-initrd", str(spec.initrd),
        "-append", kernel_cmdline(spec, nonce),
    ]
    if spec.qmp_socket is not None:
        argv += ["-qmp", f"unix:{spec.qmp_socket},server=on,wait=off"]
    for proxy in spec.proxies:
        argv += ["-device", f"x-pci-proxy-dev,id={proxy.id},fd={proxy.fd}"]
    for device in spec.devices:
        argv += ["-device", device]
    argv += list(spec.extra_args)
    return argv


def parse_status(transcript: str, nonce: str) -> int | None:
    """The script's exit status from ``MPQEMU-GUESTKIT-DONE <nonce> rc=<n>``, None if absent."""
    match = re.search(rf"^{MARKER} {re.escape(nonce)} rc=(\d+)\s*$", transcript, re.M)
    return int(match.group(1)) if match else None
