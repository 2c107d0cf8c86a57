"""The service runs a vfio-user device under the same confinement, supervision and recovery as an
mpqemu one, with QEMU 11.1's vfio-user-pci client and a real Linux guest (TCG, one boot).

The service's own code (Daemon with the service's confined launcher) runs in this process: its
DirectDriver runs QEMU as root, because the 11.1 binary lives in a sid root under root's cache
that an unprivileged QEMU user cannot reach (tests/system/test_drivers_vfio_user.py says the
same). Checked: the remote behind vfio-user-pci is confined as seen from the host (Seccomp 2,
NoNewPrivs 1, uid not 0, its own namespaces); QEMU's listening path sat in a 0700 directory and
is gone; the guest sees the device; a SIGKILLed remote is detected and replugged (the guest
acknowledges the unplug, QEMU connects to a fresh path and negotiates VERSION with a fresh remote,
the guest sees the device); attach and detach of a second vfio-user device; a hard reset; stop
leaves no process behind.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import stat
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from mpqemu_mgmt.domain.spec import GuestSpec
from mpqemu_mgmt.guestkit.qemu11 import Qemu11
from mpqemu_mgmt.orchestrate.driver import DirectDriver, GuestDriver
from mpqemu_mgmt.orchestrate.heartbeat import Settings
from mpqemu_mgmt.procfs import pid_alive
from mpqemu_mgmt.service.control import Peer
from mpqemu_mgmt.service.daemon import Daemon, service_launcher
from mpqemu_mgmt.service.events import read_events
from mpqemu_mgmt.service.paths import StatePaths
from tests.integration.orchestrate_helpers import processes_under, short_root
from tests.system.guest_fixture import EDU, TESTDEV, guest_images, vfio_user_edu_spec, wait_seen

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="confined remotes (uid drop, bwrap) need root"),
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
    pytest.mark.timeout(240),
]


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def assert_confined(pid: int) -> None:
    st = _status(pid)
    assert st["Seccomp"] == "2", st["Seccomp"]
    assert st["NoNewPrivs"] == "1"
    assert st["Uid"].split()[0] != "0" and st["Gid"].split()[0] != "0"
    for ns in ("pid", "net", "user", "mnt", "ipc", "uts"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns


async def qemu_pci(daemon: Daemon, name: str) -> dict[str, tuple[int, int]]:
    """The main QEMU's view (query-pci): qdev id → (vendor, device) of the devices with an id."""
    rt = daemon.runtimes[name]
    chan = await daemon.driver(rt.spec).channel(rt)  # type: ignore[attr-defined]
    buses = await chan.execute("query-pci", timeout=5.0)
    return {d["qdev_id"]: (d["id"]["vendor"], d["id"]["device"])
            for bus in buses for d in bus["devices"] if d.get("qdev_id")}


def test_service_vfio_user_confined_supervised_replugged(qemu11: Qemu11) -> None:
    root = short_root("mpqsv-")
    wrapper = qemu11.write_wrapper(root / "qemu11.sh", binds=[root])
    img = guest_images(root / "images")
    name = f"vfs-{uuid.uuid4().hex[:6]}"
    spec = vfio_user_edu_spec(name, wrapper, img, 'on_failure = "replug"')
    paths = StatePaths(root / "st", root / "run")
    launcher = service_launcher()
    assert launcher is not None

    def factory(spec: GuestSpec, state_root: Path, before_step: Any = None) -> GuestDriver:
        return DirectDriver(state_root, run_as=None, launcher=launcher, before_step=before_step)

    console = paths.guest_dir(name) / "console.log"

    def events(kind: str, device: str | None, after: float) -> list[Any]:
        return [e for e in read_events(paths.events, name)
                if e.kind == kind and e.device == device and e.time >= after]

    async def wait_event(kind: str, device: str | None, after: float, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = events(kind, device, after)
            if found:
                return found[0]
            await asyncio.sleep(0.05)
        kinds = [(e.kind, e.device, e.detail) for e in read_events(paths.events, name)][-12:]
        raise AssertionError(f"no {kind} event for {device} within {timeout}s; last events {kinds}")

    async def main() -> None:
        daemon = Daemon(paths, Settings(), driver_factory=factory)
        await daemon.open(serve=False)
        pids: list[int] = []

        async def call(command: str, **args: Any) -> Any:
            async def progress(_msg: str) -> None:
                return None
            return await daemon.handle(command, args, Peer(os.geteuid(), os.getpid()), progress)

        try:
            t_start = time.time()
            await call("define", spec=spec.to_dict())
            await call("start", name=name)
            st = await call("status", name=name)
            (dev,) = st["devices"]
            pid = dev["pid"]
            pids.append(pid)
            assert_confined(pid)
            assert dev["confinement"]["seccomp"] == "enforce" and dev["confinement"]["uid"] != 0
            assert "net" in dev["confinement"]["namespaces"]
            vfu = paths.guest_dir(name) / "vfu"
            assert stat.S_IMODE(vfu.stat().st_mode) == 0o700 and list(vfu.iterdir()) == []
            await wait_event("healthy", "edu0", t_start, 15)
            await asyncio.to_thread(wait_seen, console, {EDU})

            # the remote dies: detected by its pidfd, replugged through a fresh path and remote
            t_kill = time.time()
            os.kill(pid, signal.SIGKILL)
            dead = await wait_event("dead", "edu0", t_kill, 5)
            print(f"\nDETECTION vfio-user remote SIGKILL: {(dead.time - t_kill) * 1000:.0f} ms")
            replugged = await wait_event("replugged", "edu0", t_kill, 90)
            print(f"REPLUG vfio-user remote: {replugged.time - t_kill:.1f} s")
            st = await call("status", name=name)
            (dev,) = st["devices"]
            assert dev["pid"] != pid and dev["restarts"] == 1
            assert not pid_alive(pid)
            pids.append(dev["pid"])
            assert_confined(dev["pid"])
            assert list(vfu.iterdir()) == []
            await wait_event("healthy", "edu0", t_kill, 15)
            await asyncio.to_thread(wait_seen, console, {EDU})
            # "replugged" means: the guest acknowledged the unplug (device_del waits for
            # DEVICE_DELETED), then vfio-user-pci's realize negotiated with the fresh remote on a
            # fresh path and read its config space; QEMU shows edu's IDs for edu0 again
            assert await qemu_pci(daemon, name) == {"edu0": (0x1234, 0x11E8)}

            # hot-plug and hot-unplug a second vfio-user device, also confined
            res = await call("attach", name=name, device={"id": "t1", "model": "pci-testdev",
                                                          "transport": "vfio-user"})
            assert res["plugged"] is True
            pids.append(res["pid"])
            assert_confined(res["pid"])
            await asyncio.to_thread(wait_seen, console, {EDU, TESTDEV})
            await call("detach", name=name, id="t1")
            await asyncio.to_thread(wait_seen, console, {EDU}, {TESTDEV})
            assert not pid_alive(res["pid"])

            # the operator's hard reset: unplug, fresh remote, plug
            await call("reset", name=name, id="edu0")
            st = await call("status", name=name)
            pids.append(st["devices"][0]["pid"])
            assert st["devices"][0]["pid"] not in pids[:-1]
            assert_confined(st["devices"][0]["pid"])
            assert await qemu_pci(daemon, name) == {"edu0": (0x1234, 0x11E8)}
            await asyncio.to_thread(wait_seen, console, {EDU})

            await call("stop", name=name, force=True)
            for p in pids:
                assert not pid_alive(p), p
            assert processes_under(root) == []
        finally:
            if name in daemon.runtimes:
                await call("stop", name=name, force=True)
            await daemon.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 220))
    finally:
        for pid, _cmd in processes_under(root):
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
