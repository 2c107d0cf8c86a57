"""What a QEMU binary can do, asked once per binary: ``-device help`` and ``-machine help``.

Before a start or a hot-plug the drivers check that the binary has what the plan will ask of it
(``x-pci-proxy-dev`` for the mpqemu transport, ``vfio-user-pci`` for vfio-user, and ``x-remote``
for stock remotes), so a missing device is a refusal with the reason before anything changes, not
a ``device_add`` error after remotes were started. This mirrors the capability probe of QEMU's own
``tests/avocado/multiprocess.py`` era (``-device help`` for ``x-pci-proxy-dev``). IO shell: runs the
binary; must not decide what to do about a missing capability beyond raising the refusal.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable
from dataclasses import dataclass

from mpqemu_mgmt.domain.spec import DeviceSpec
from mpqemu_mgmt.errors import RefusedError

_DEVICE = re.compile(r'^name "([^"]+)"', re.M)
_MACHINE = re.compile(r"^(\S+)\s", re.M)


@dataclass(frozen=True)
class Capabilities:
    devices: frozenset[str]
    machines: frozenset[str]


_cache: dict[str, Capabilities] = {}


async def _help(binary: str, what: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        binary, what, "help", stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    return out.decode(errors="replace")


async def probe(binary: str) -> Capabilities:
    caps = _cache.get(binary)
    if caps is None:
        try:
            devices, machines = await asyncio.gather(_help(binary, "-device"), _help(binary, "-machine"))
        except OSError as exc:
            raise RefusedError(f"cannot run {binary}: {exc.strerror}", binary=binary) from exc
        caps = Capabilities(frozenset(_DEVICE.findall(devices)), frozenset(_MACHINE.findall(machines)))
        _cache[binary] = caps
    return caps


def missing(caps: Capabilities, devices: Iterable[DeviceSpec]) -> list[str]:
    """What the main QEMU lacks for these devices (pure)."""
    need: set[str] = set()
    for dev in devices:
        need.add("vfio-user-pci" if dev.transport == "vfio-user" else "x-pci-proxy-dev")
    return sorted(need - caps.devices)


async def check(binary: str, devices: Iterable[DeviceSpec]) -> None:
    """Refuse (exit 3) if ``binary`` lacks a proxy device these devices need."""
    devs = list(devices)
    if not devs:
        return
    lacking = missing(await probe(binary), devs)
    if lacking:
        raise RefusedError(
            f"{binary} has no {', '.join(lacking)} device (QEMU 7.2 has x-pci-proxy-dev; vfio-user-pci "
            "needs QEMU 10.1 or later)", binary=binary, missing=lacking)
