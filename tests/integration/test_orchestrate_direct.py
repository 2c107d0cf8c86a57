"""The direct driver against real QEMU 7.2: a paused-then-running main QEMU (no guest OS) with
stock ``-machine x-remote`` remotes. Start, hot-plug, reset, adopt, stop, and a failure injected
before every plan step leaves no process and no device behind. (Unplug needs a guest that answers
ACPI, so it is in tests/system.)"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from pathlib import Path

import pytest

from mpqemu_mgmt.domain.spec import DeviceSpec, GuestSpec, parse_spec
from mpqemu_mgmt.errors import MigrationRefused, MpqemuError
from mpqemu_mgmt.orchestrate.driver import DirectDriver, GuestRuntime
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

RUN_AS = "nobody" if os.geteuid() == 0 else None


def spec(machine: str = "pc", name: str = "it") -> GuestSpec:
    return parse_spec(f"""
name = "{name}"
memory = "128M"
machine = "{machine}"
[[device]]
id = "tdev"
model = "pci-testdev"
backend = "qemu"
[[device]]
id = "lsi0"
model = "lsi53c895a"
backend = "qemu"
""", "it.toml")


async def _ids(driver: DirectDriver, runtime: GuestRuntime) -> set[str]:
    chan = await driver.channel(runtime)
    items = await chan.execute("qom-list", {"path": "/machine/peripheral"}, timeout=5)
    return {i["name"] for i in items if str(i.get("type", "")).startswith("child<")}


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid line")


@pytest.mark.parametrize("machine", ["pc", "q35"])
def test_start_attach_reset_stop(machine: str, state_root: Path) -> None:  # noqa: F811
    async def main() -> None:
        driver = DirectDriver(state_root, run_as=RUN_AS)
        runtime = await driver.start(spec(machine))
        try:
            assert pid_alive(runtime.pid)
            if RUN_AS:
                assert _uid(runtime.pid) != 0, "main QEMU must not run as root"
            assert set(runtime.remotes) == {"tdev", "lsi0"}
            assert await _ids(driver, runtime) >= {"tdev", "lsi0"}
            status = await (await driver.channel(runtime)).execute("query-status", timeout=5)
            assert status["status"] == "running"
            assert "-sandbox" in Path(f"/proc/{runtime.pid}/cmdline").read_bytes().decode(errors="replace")
            assert Path(runtime.console_log).exists()

            t0 = time.perf_counter()
            remote = await driver.attach(runtime, DeviceSpec(id="net0", model="e1000", backend="qemu"))
            elapsed = time.perf_counter() - t0
            assert pid_alive(remote.pid) and remote.placement is not None
            realized = await (await driver.channel(runtime)).execute(
                "qom-get", {"path": "/machine/peripheral/net0", "property": "realized"}, timeout=5)
            assert realized is True
            assert [d.id for d in runtime.spec.devices] == ["tdev", "lsi0", "net0"]
            assert elapsed < 5.0

            await driver.reset(runtime)
            for r in runtime.remotes.values():
                assert pid_alive(r.pid)

            await driver.pause(runtime)
            chan = await driver.channel(runtime)
            assert (await chan.execute("query-status", timeout=5))["status"] == "paused"
            await driver.resume(runtime)
            assert (await chan.execute("query-status", timeout=5))["status"] == "running"
            with pytest.raises(MigrationRefused):
                driver.refuse_migration(runtime.spec, "migrate")

            # adopt: a fresh driver (the service restarted) finds the same guest from its record.
            record = runtime.to_record()
            driver2 = DirectDriver(state_root, run_as=RUN_AS)
            await (await driver.channel(runtime)).close()
            driver._channels.clear()
            adopted = await driver2.adopt(record)
            assert adopted.pid == runtime.pid and set(adopted.remotes) == {"tdev", "lsi0", "net0"}
            assert await _ids(driver2, adopted) >= {"tdev", "lsi0", "net0"}
            runtime, driver = adopted, driver2
        finally:
            pids = await force_stop(driver, runtime)
        assert_gone(pids, state_root)
        assert not list(state_root.glob("*/*.sock")) and not list(state_root.glob("*/*.qmp"))

    asyncio.run(asyncio.wait_for(main(), 90))


def test_failure_at_every_start_step_leaves_nothing(state_root: Path) -> None:  # noqa: F811
    steps = len(plan_for(spec(), "start").steps)

    async def main() -> None:
        for at in range(steps):
            driver = DirectDriver(state_root, run_as=RUN_AS, before_step=inject_before(at))
            with pytest.raises(Injected) as info:
                await driver.start(spec())
            assert "rolled_back" in info.value.details
            assert processes_under(state_root) == [], f"step {at}: {processes_under(state_root)}"

    asyncio.run(asyncio.wait_for(main(), 120))


def test_failure_at_every_attach_step_leaves_guest_as_it_was(state_root: Path) -> None:  # noqa: F811
    async def main() -> None:
        driver = DirectDriver(state_root, run_as=RUN_AS)
        runtime = await driver.start(spec())
        try:
            before = await _ids(driver, runtime)
            dev = DeviceSpec(id="net1", model="e1000", backend="qemu")
            attach_steps = len(plan_for(runtime.spec, "attach", device=dev).steps)
            for at in range(attach_steps):
                driver.before_step = inject_before(at)
                with pytest.raises(Injected):
                    await driver.attach(runtime, dev)
                driver.before_step = None
                assert await _ids(driver, runtime) == before
                assert set(runtime.remotes) == {"tdev", "lsi0"}
                assert [d.id for d in runtime.spec.devices] == ["tdev", "lsi0"]
                fds = await (await driver.channel(runtime)).execute("query-status", timeout=5)
                assert fds["status"] == "running"
                own = [p for p, cmd in processes_under(state_root) if "net1" in cmd]
                assert own == [], f"attach step {at}: {own}"
            # And after all those failures a real attach still works (no stale fd name or id).
            await driver.attach(runtime, dev)
            assert "net1" in await _ids(driver, runtime)
        finally:
            await driver.stop(runtime, force=True)

    asyncio.run(asyncio.wait_for(main(), 120))


def test_remote_that_dies_at_start_is_reported(state_root: Path) -> None:  # noqa: F811
    bad = parse_spec('name = "bad"\n[[device]]\nid = "x"\nmodel = "no-such-device"\nbackend = "qemu"\n')

    async def main() -> None:
        driver = DirectDriver(state_root, run_as=RUN_AS)
        with pytest.raises(MpqemuError) as info:
            await driver.start(bad)
        assert info.value.exit_code == 4  # ProcessFailed: the remote exited
        assert "no-such-device" in info.value.message

    asyncio.run(asyncio.wait_for(main(), 60))


def test_confined_remotes(state_root: Path) -> None:  # noqa: F811
    """The same start/attach/stop with confine.launcher's remotes (uid, rlimits, bwrap namespaces)."""
    if os.geteuid() != 0:
        pytest.skip("confined remotes need root (dedicated uid, namespaces)")
    from mpqemu_mgmt.orchestrate.confined import ConfinedLauncher

    s = parse_spec('name = "conf"\n[[device]]\nid = "edu0"\nmodel = "edu"\n'
                   '[[device]]\nid = "lsi0"\nmodel = "lsi53c895a"\nbackend = "qemu"\n')

    async def main() -> None:
        driver = DirectDriver(state_root, run_as=RUN_AS, launcher=ConfinedLauncher())
        runtime = await driver.start(s)
        try:
            for remote in runtime.remotes.values():
                assert remote.confinement["uid"] != 0
                assert remote.confinement["namespaces"], remote.confinement
                assert _uid(remote.pid) != 0
            assert runtime.remotes["edu0"].confinement["seccomp"] == "enforce"
            assert runtime.remotes["lsi0"].confinement["seccomp"] == "qemu-sandbox"
            await driver.attach(runtime, DeviceSpec(id="t1", model="pci-testdev", backend="builtin"))
            assert await _ids(driver, runtime) >= {"edu0", "lsi0", "t1"}
            await driver.reset(runtime)
        finally:
            pids = await force_stop(driver, runtime)
        for pid in pids:
            assert not pid_alive(pid)

    asyncio.run(asyncio.wait_for(main(), 90))


def fd_targets(pid: int) -> dict[str, str]:
    """fd → what it points at, for the fds ``pid`` holds now (one read each: an fd the process
    closes meanwhile, such as a QMP client's, is left out instead of failing the readlink)."""
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            out[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
    return out


@pytest.mark.parametrize("readonly", [True, False])
def test_backing_file_device(readonly: bool, state_root: Path) -> None:  # noqa: F811
    """virtio-blk with a backing file: the launcher opens it (read-only when asked) and passes the fd."""
    disk = state_root / "disk.img"
    disk.write_bytes(b"\0" * (1 << 20))
    s = parse_spec(f'name = "blk"\n[[device]]\nid = "vd0"\nmodel = "virtio-blk"\n'
                   f'backing = "{disk}"\nreadonly = {"true" if readonly else "false"}\n')

    async def main() -> None:
        driver = DirectDriver(state_root, run_as=RUN_AS)
        runtime = await driver.start(s)
        try:
            remote = runtime.remotes["vd0"]
            fds = fd_targets(remote.pid)
            assert str(disk) in fds.values(), fds
            flags = [
                int(Path(f"/proc/{remote.pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8)
                for fd, target in fds.items() if target == str(disk)
            ]
            assert all((f & os.O_ACCMODE) == (os.O_RDONLY if readonly else os.O_RDWR) for f in flags), flags
            assert "vd0" in await _ids(driver, runtime)
        finally:
            await driver.stop(runtime, force=True)

    asyncio.run(asyncio.wait_for(main(), 60))


def test_unreadable_kernel_is_refused_up_front(state_root: Path) -> None:  # noqa: F811
    if RUN_AS is None:
        pytest.skip("only meaningful when QEMU drops to an unprivileged user (root)")
    secret = state_root / "private"
    secret.mkdir(mode=0o700)
    (secret / "vmlinuz").write_bytes(b"not a kernel")
    s = parse_spec(f'name = "k"\n[boot]\nkernel = "{secret}/vmlinuz"\n')

    async def main() -> None:
        from mpqemu_mgmt.errors import RefusedError

        with pytest.raises(RefusedError, match="not searchable") as info:
            await DirectDriver(state_root, run_as=RUN_AS).start(s)
        assert info.value.exit_code == 3 and info.value.details["path"].endswith("vmlinuz")
        assert not (state_root / "k").exists()  # nothing changed

    asyncio.run(main())


def test_vfio_user_on_qemu72_is_refused_up_front(state_root: Path) -> None:  # noqa: F811
    from mpqemu_mgmt.errors import RefusedError
    from mpqemu_mgmt.orchestrate.capabilities import probe

    s = parse_spec('name = "v72"\n[[device]]\nid = "e"\nmodel = "edu"\ntransport = "vfio-user"\n')

    async def main() -> None:
        caps = await probe(s.qemu_binary)
        assert "x-pci-proxy-dev" in caps.devices and "x-remote" in caps.machines
        if "vfio-user-pci" in caps.devices:
            pytest.skip("this qemu-system-x86_64 has vfio-user-pci")
        driver = DirectDriver(state_root, run_as=RUN_AS)
        with pytest.raises(RefusedError, match="vfio-user-pci") as info:
            await driver.start(s)
        assert info.value.exit_code == 3
        assert not (state_root / "v72").exists() and processes_under(state_root) == []
        # and as a hot-plug into a running guest
        runtime = await driver.start(parse_spec('name = "v72b"\n'))
        try:
            with pytest.raises(RefusedError, match="vfio-user-pci"):
                await driver.attach(runtime, s.devices[0])
            assert runtime.remotes == {}
        finally:
            await driver.stop(runtime, force=True)

    asyncio.run(asyncio.wait_for(main(), 60))
