"""The libvirt driver against a real libvirtd and QEMU 7.2, stock x-remote remotes, no guest OS:
START_PAUSED + qemuMonitorCommandWithFiles(getfd) + device_add + resume; hot-plug; reset;
migration/save refused by us up front and by QEMU; a failure before every start step leaves no
domain running and no process behind."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from mpqemu_mgmt.domain.spec import DeviceSpec, GuestSpec, parse_spec
from mpqemu_mgmt.errors import MigrationRefused, OrchestrationError
from mpqemu_mgmt.orchestrate.driver import GuestRuntime, LibvirtDriver
from mpqemu_mgmt.orchestrate.plans import plan_for
from mpqemu_mgmt.procfs import pid_alive
from tests.integration.orchestrate_helpers import (  # noqa: F401
    Injected,
    assert_gone,
    force_stop,
    inject_before,
    processes_under,
    state_root,
)
from tests.system.libvirt_fixture import libvirt_host  # noqa: F401


def spec(machine: str = "pc") -> GuestSpec:
    return parse_spec(f"""
name = "mpqt-{uuid.uuid4().hex[:8]}"
memory = "128M"
machine = "{machine}"
driver = "libvirt"
[[device]]
id = "tdev"
model = "pci-testdev"
backend = "qemu"
[[device]]
id = "lsi0"
model = "lsi53c895a"
backend = "qemu"
""", "lv.toml")


async def _ids(driver: LibvirtDriver, runtime: GuestRuntime) -> set[str]:
    chan = await driver.channel(runtime)
    items = await chan.execute("qom-list", {"path": "/machine/peripheral"}, timeout=10)
    return {i["name"] for i in items if str(i.get("type", "")).startswith("child<")}


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_libvirt_start_attach_reset_stop(machine: str, state_root: Path, libvirt_host) -> None:  # noqa: F811
    s = spec(machine)

    async def main() -> None:
        driver = LibvirtDriver(state_root)
        runtime = await driver.start(s)
        try:
            guest = driver.host(s.uri).lookup(s.name)
            assert guest is not None and guest.is_active() and not guest.is_paused()
            assert runtime.pid and pid_alive(runtime.pid)
            assert await _ids(driver, runtime) >= {"tdev", "lsi0"}
            assert any("custom monitor" in m for m in await driver.taints(runtime))  # getfd + device_add
            # A failure before each hot-plug step leaves the guest as it was (closefd through libvirt).
            bad = DeviceSpec(id="net9", model="e1000", backend="qemu")
            before = await _ids(driver, runtime)
            for at in range(len(plan_for(runtime.spec, "attach", device=bad).steps)):
                driver.before_step = inject_before(at)
                with pytest.raises(Injected):
                    await driver.attach(runtime, bad)
                driver.before_step = None
                assert await _ids(driver, runtime) == before
                assert "net9" not in runtime.remotes
                assert not [p for p, cmd in processes_under(state_root) if "net9" in cmd]
            await driver.attach(runtime, DeviceSpec(id="net0", model="e1000", backend="qemu"))
            assert "net0" in await _ids(driver, runtime)
            await driver.reset(runtime)
            # adopt: a fresh driver (service restart) re-attaches from the saved record.
            fresh = LibvirtDriver(state_root)
            adopted = await fresh.adopt(runtime.to_record())
            assert adopted.pid == runtime.pid and set(adopted.remotes) == {"tdev", "lsi0", "net0"}
            assert await _ids(fresh, adopted) >= {"tdev", "lsi0", "net0"}
            await (await fresh.channel(adopted)).close()
            with pytest.raises(MigrationRefused):
                driver.refuse_migration(runtime.spec, "save")
            # QEMU itself blocks migration too (hw/remote/proxy.c migration blocker).
            with pytest.raises(OrchestrationError, match="does not support migration"):
                await (await driver.channel(runtime)).execute("migrate", {"uri": "exec:cat >/dev/null"},
                                                               timeout=10)
        finally:
            pids = await force_stop(driver, runtime)
        assert_gone(pids, state_root)

    try:
        asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        asyncio.run(LibvirtDriver(state_root).undefine(s))


def test_libvirt_failure_at_every_start_step(state_root: Path, libvirt_host) -> None:  # noqa: F811
    s = spec()
    steps = len(plan_for(s, "start").steps)

    async def main() -> None:
        try:
            for at in range(steps):
                driver = LibvirtDriver(state_root, before_step=inject_before(at))
                with pytest.raises(Injected):
                    await driver.start(s)
                guest = driver.host(s.uri).lookup(s.name)
                assert guest is None or not guest.is_active(), f"domain still running after step {at}"
                assert processes_under(state_root) == [], f"step {at}: {processes_under(state_root)}"
        finally:
            await LibvirtDriver(state_root).undefine(s)

    asyncio.run(asyncio.wait_for(main(), 240))
