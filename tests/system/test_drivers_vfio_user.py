"""The direct driver with ``transport = "vfio-user"``: QEMU 11.1's vfio-user-pci client (from the
guest kit's Debian sid root, run through bubblewrap) and our edu served over vfio-user. The driver
listens on a path in the state directory, device_add connects to it, and the remote is started on
that connection. A real guest sees the device; hot-plug and stop leave nothing behind.

QEMU runs as root here: the sid root lives under root's cache, which an unprivileged bwrap cannot
reach. Remotes use the unconfined ProcessLauncher here; the confined launcher's vfio-user hand-over
(LaunchRequest.connected) is proven under the service in test_service_vfio_user.py."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path

import pytest

from mpqemu_mgmt.domain.spec import DeviceSpec
from mpqemu_mgmt.orchestrate.driver import DirectDriver
from mpqemu_mgmt.orchestrate.processes import ProcessLauncher
from mpqemu_mgmt.procfs import pid_alive
from tests.integration.orchestrate_helpers import processes_under, state_root  # noqa: F401
from tests.system.guest_fixture import EDU, guest_images, vfio_user_edu_spec, wait_seen

TESTDEV = "0x1b36:0x0005"


def qemu11_wrapper(state: Path) -> Path:
    try:
        from mpqemu_mgmt.guestkit.qemu11 import fetch_qemu11

        qemu = fetch_qemu11()
    except Exception as exc:
        pytest.skip(f"QEMU 11.1 (sid root) is not available: {exc}")
    return qemu.write_wrapper(state / "qemu11.sh", binds=[state])


def test_vfio_user_guest(state_root: Path) -> None:  # noqa: F811
    if os.geteuid() != 0:
        pytest.skip("needs root (bubblewrap over the sid root in root's cache)")
    wrapper = qemu11_wrapper(state_root)
    img = guest_images(state_root / "images")
    spec = vfio_user_edu_spec(f"mpqt-vfu-{uuid.uuid4().hex[:6]}", wrapper, img)
    driver = DirectDriver(state_root, run_as=None, launcher=ProcessLauncher(None))
    console = state_root / spec.name / "console.log"

    async def main() -> None:
        runtime = await driver.start(spec)
        try:
            assert not list((state_root / spec.name).glob("vfu/*.sock")), "listening path must be gone"
            await asyncio.to_thread(wait_seen, console, {EDU})
            await driver.attach(runtime, DeviceSpec(id="t1", model="pci-testdev", transport="vfio-user"))
            await asyncio.to_thread(wait_seen, console, {EDU, TESTDEV})
        finally:
            pids = [*(r.pid for r in runtime.remotes.values())]
            await driver.stop(runtime, force=True)
        for pid in pids:
            assert not pid_alive(pid)
        assert processes_under(state_root) == []

    asyncio.run(asyncio.wait_for(main(), 180))
