"""Both drivers with a real Linux guest (TCG): start with our edu and QEMU's lsi53c895a and the guest
sees both; hot-plug a third and the guest sees it; hot-unplug one: the guest acknowledges,
DEVICE_DELETED arrives, the remote exits; system_reset reaches every remote (DEVICE_RESET counted
by our edu's QMP ``x-device-status``); stop leaves no process behind."""

from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from mpqemu_mgmt.domain.spec import DeviceSpec, GuestSpec, parse_spec
from mpqemu_mgmt.orchestrate.channel import QmpChannel
from mpqemu_mgmt.orchestrate.driver import DirectDriver, GuestRuntime, LibvirtDriver
from mpqemu_mgmt.orchestrate.processes import wait_exit
from mpqemu_mgmt.procfs import pid_alive
from tests.integration.orchestrate_helpers import (  # noqa: F401
    Injected,
    assert_gone,
    force_stop,
    inject_before,
    processes_under,
    state_root,
)
from tests.system.guest_fixture import EDU, LSI, TESTDEV, guest_images, wait_seen
from tests.system.libvirt_fixture import ensure_libvirtd

RUN_AS = "nobody" if os.geteuid() == 0 else None


def guest_spec(driver: str, images_dir: Path, machine: str = "pc") -> GuestSpec:
    img = guest_images(images_dir)
    extra = 'uri = "qemu:///system"\n' if driver == "libvirt" else ""
    return parse_spec(f"""
name = "mpqt-{driver}-{uuid.uuid4().hex[:6]}"
memory = "256M"
machine = "{machine}"
accel = "tcg"
driver = "{driver}"
{extra}
{img.boot_toml()}[[device]]
id = "edu0"
model = "edu"
backend = "builtin"
[[device]]
id = "lsi0"
model = "lsi53c895a"
backend = "qemu"
""", f"{driver}-guest.toml")


async def device_status(remote_qmp: str) -> dict[str, Any]:
    chan = await QmpChannel.connect(remote_qmp, timeout=5)
    try:
        result = await chan.execute("x-device-status", timeout=5)
        assert isinstance(result, dict)
        return result
    finally:
        await chan.close()


@pytest.mark.parametrize(("driver_name", "machine"), [("direct", "pc"), ("libvirt", "pc"), ("direct", "q35")])
def test_guest_lifecycle(driver_name: str, machine: str, state_root: Path) -> None:  # noqa: F811
    if driver_name == "libvirt" and (reason := ensure_libvirtd()) is not None:
        pytest.skip(reason)
    spec = guest_spec(driver_name, state_root / "images", machine)
    driver = DirectDriver(state_root, run_as=RUN_AS) if driver_name == "direct" else LibvirtDriver(state_root)
    console = Path(state_root / spec.name / "console.log")

    async def main() -> None:
        runtime: GuestRuntime = await driver.start(spec)
        try:
            # 1. the guest sees both devices present from the first boot.
            await asyncio.to_thread(wait_seen, console, {EDU, LSI})

            # 2. hot-plug a third: the guest sees it appear.
            await driver.attach(runtime, DeviceSpec(id="t1", model="pci-testdev", backend="qemu"))
            await asyncio.to_thread(wait_seen, console, {EDU, LSI, TESTDEV})

            # 3. hot-unplug: DEVICE_DELETED waited inside detach; the remote exits; the guest let go.
            lsi_remote = runtime.remotes["lsi0"]
            await driver.detach(runtime, "lsi0")
            assert await wait_exit(lsi_remote.pid, None, 5.0), "lsi0's remote still running"
            assert "lsi0" not in runtime.remotes
            await asyncio.to_thread(wait_seen, console, {EDU, TESTDEV}, {LSI})

            # 4. system_reset: each remote receives DEVICE_RESET.
            edu = runtime.remotes["edu0"]
            before = (await device_status(edu.qmp_path))["messages"].get("DeviceReset", 0)
            await driver.reset(runtime)
            after = (await device_status(edu.qmp_path))["messages"].get("DeviceReset", 0)
            # At least one: a guest-initiated reboot right after (e.g. during the reboot) adds more.
            assert after >= before + 1
            assert all(pid_alive(r.pid) for r in runtime.remotes.values())
            # The rebooted guest comes back with the same devices.
            await asyncio.to_thread(wait_seen, console, {EDU, TESTDEV}, {LSI})

            # 5. hard reset of one device: unplug, a fresh remote, plug, in the same slot.
            old = runtime.remotes["edu0"]
            slot = old.placement
            await driver.reset(runtime, "edu0")
            new = runtime.remotes["edu0"]
            assert new.pid != old.pid and new.placement == slot
            assert await wait_exit(old.pid, None, 5.0), "the old edu remote is still running"
            assert (await device_status(new.qmp_path))["messages"].get("PciConfigRead", 0) > 0
            await asyncio.to_thread(wait_seen, console, {EDU, TESTDEV}, {LSI})
        finally:
            pids = await force_stop(driver, runtime)
        # 6. stop: no process left.
        assert_gone(pids, state_root)

    async def undefine() -> None:
        if isinstance(driver, LibvirtDriver):
            await driver.undefine(spec)

    try:
        asyncio.run(asyncio.wait_for(main(), 240))
    finally:
        asyncio.run(undefine())  # also when start itself failed (the domain stays defined)


def test_failures_during_unplug_and_hard_reset_leave_nothing_behind(state_root: Path) -> None:  # noqa: F811
    """A failure before each step of detach and of hard-reset: afterwards every device QEMU still has
    is served by a live remote, and no remote runs for a device QEMU no longer has."""
    from mpqemu_mgmt.orchestrate.plans import Step, plan_for

    spec = guest_spec("direct", state_root / "images")
    driver = DirectDriver(state_root, run_as=RUN_AS)
    console = Path(state_root / spec.name / "console.log")

    async def plugged(runtime: GuestRuntime) -> set[str]:
        items = await (await driver.channel(runtime)).execute(
            "qom-list", {"path": "/machine/peripheral"}, timeout=10)
        return {i["name"] for i in items if str(i.get("type", "")).startswith("child<")}

    async def consistent(runtime: GuestRuntime) -> None:
        in_qemu = await plugged(runtime)
        assert set(runtime.remotes) == in_qemu
        assert [d.id for d in runtime.spec.devices] == sorted(in_qemu, key=[
            d.id for d in runtime.spec.devices].index)
        for dev_id, remote in runtime.remotes.items():
            assert pid_alive(remote.pid), f"{dev_id}: QEMU has it but its remote is dead"
        live = {cmd for _, cmd in processes_under(state_root)}
        for dev_id in {"t0", "t1", "edu0", "lsi0", "hung"} - in_qemu:
            assert not any(f"remote-{dev_id}.qmp" in c or f"devid={dev_id}," in c for c in live), dev_id

    async def main() -> None:
        runtime = await driver.start(spec)
        try:
            await asyncio.to_thread(wait_seen, console, {EDU, LSI})
            detach_steps = len(plan_for(runtime.spec, "detach", device_id="lsi0").steps)
            for at in range(detach_steps):
                dev_id = f"t{at}"
                await driver.attach(runtime, DeviceSpec(id=dev_id, model="pci-testdev", backend="qemu"))
                await asyncio.to_thread(wait_seen, console, {TESTDEV})
                driver.before_step = inject_before(at)
                with pytest.raises(Injected):
                    await driver.detach(runtime, dev_id)
                driver.before_step = None
                await consistent(runtime)
            # A remote that hangs during hot-plug: QEMU's device_add blocks in realize and times out;
            # the rollback kills the remote (QEMU unblocks), and the guest acks the unplug.
            import signal

            from mpqemu_mgmt.errors import StepTimeout

            def hang(index: int, step: Step) -> None:
                if step.command == "device_add" and step.device == "hung":
                    os.kill(runtime.remotes["hung"].pid, signal.SIGSTOP)

            driver.before_step = hang
            with pytest.raises(StepTimeout) as info:
                await driver.attach(runtime, DeviceSpec(id="hung", model="pci-testdev", backend="qemu"))
            driver.before_step = None
            assert "still_plugged" not in info.value.details, info.value.details
            await consistent(runtime)

            hard = len(plan_for(runtime.spec, "hard-reset", device_id="edu0",
                                placements=runtime.placements()).steps)
            for at in range(hard):
                if "edu0" not in runtime.remotes:
                    break
                driver.before_step = inject_before(at)
                with pytest.raises(Injected):
                    await driver.reset(runtime, "edu0")
                driver.before_step = None
                await consistent(runtime)
        finally:
            await driver.stop(runtime, force=True)
        assert processes_under(state_root) == []

    asyncio.run(asyncio.wait_for(main(), 240))
