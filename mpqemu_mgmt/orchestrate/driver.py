"""The drivers the management service calls: one guest lifecycle API, two ways to run the main QEMU.

API (``GuestDriver``; every method is async and either completes or rolls back and raises an
:class:`~mpqemu_mgmt.errors.MpqemuError`)::

    start(spec) -> GuestRuntime             main QEMU paused, every remote + getfd + device_add, cont
    attach(runtime, device_spec) -> RemoteRuntime     hot-plug one device (fresh confined remote)
    detach(runtime, device_id) -> None      hot-unplug: DEVICE_DELETED waited (20 s × 8), remote stopped
    reset(runtime, device_id | None)        None: system_reset (every remote gets DEVICE_RESET);
                                            an id: hard reset = unplug, fresh remote, plug
    stop(runtime, force=False) -> None      guest down (powerdown, or quit/destroy with force), remotes reaped
    pause(runtime) / resume(runtime)
    adopt(record) -> GuestRuntime           re-attach to a running guest from GuestRuntime.to_record()
    refuse_migration(spec, action)          raises MigrationRefused for migrate/save/snapshot

``GuestRuntime`` (orchestrate/runtime.py) exposes the main QEMU ``pid``, ``qmp_path`` (None under
libvirt, which owns the monitor), ``console_log``, and ``remotes[device_id]`` → ``RemoteRuntime``
(``pid``, ``pidfd``, ``qmp_path`` of the remote's own monitor, ``confinement``, ``log_path``,
``placement``). ``runtime.spec`` always lists the devices plugged right now.

* :class:`DirectDriver` runs ``qemu-system-x86_64`` itself (argv from qemu_argv.py): as an
  unprivileged user (``run_as``), with ``-sandbox on,…``, QMP and the serial console log in the
  guest's state directory, and talks QMP through :class:`QmpChannel`.
* :class:`LibvirtDriver` defines the domain XML (designer.py) and starts it with
  ``VIR_DOMAIN_START_PAUSED``, then plugs devices through :class:`LibvirtChannel`
  (``qemuMonitorCommandWithFiles``); a non-local URI is refused before anything changes. Extra:
  ``taints(runtime)`` (libvirt's messages, e.g. custom-monitor), ``undefine(spec)``, and
  ``start_tokens=`` (the directory the libvirt hook checks while we create the domain).

Before a start or attach, capabilities.py checks the main QEMU has the proxy device the transport
needs (x-pci-proxy-dev / vfio-user-pci) and refuses otherwise (exit 3, nothing changed).

Remotes are started by a :class:`RemoteLauncher`: by default confined.py's ConfinedLauncher
(confine.launcher) when root with bubblewrap, else :class:`ProcessLauncher` (plain, as ``run_as``).
Tests pass ``before_step`` to inject failures.
This module must not build XML or QMP by hand: plans come from plans.py, XML from the designer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from mpqemu_mgmt.domain.spec import DeviceSpec, GuestSpec, check_fd_passing
from mpqemu_mgmt.errors import MpqemuError, NotFoundError, OrchestrationError, ProcessFailed, RefusedError
from mpqemu_mgmt.orchestrate import capabilities, plans
from mpqemu_mgmt.orchestrate.channel import LibvirtChannel, MonitorChannel, QmpChannel
from mpqemu_mgmt.orchestrate.plans import Plan, Step
from mpqemu_mgmt.orchestrate.processes import (
    ProcessLauncher,
    RemoteLauncher,
    open_pidfd,
    prepare_dir,
    resolve_user,
    terminate,
    unreachable_for,
    wait_exit,
    wait_for_socket,
)
from mpqemu_mgmt.orchestrate.qemu_argv import GuestPaths
from mpqemu_mgmt.orchestrate.runner import Runner, RunReport, StepHook, close_quietly
from mpqemu_mgmt.orchestrate.runtime import GuestRuntime, RemoteRuntime
from mpqemu_mgmt.procfs import pid_alive

if TYPE_CHECKING:  # libvirt_host imports libvirt; the direct driver must work without it
    from mpqemu_mgmt.domain.libvirt_host import LibvirtGuest, LibvirtHost

__all__ = ["DirectDriver", "GuestDriver", "GuestRuntime", "LibvirtDriver", "RemoteRuntime"]


def default_launcher(run_as: str | None) -> RemoteLauncher:
    """Confined remotes (confine.launcher: own uid, rlimits, bwrap, seccomp) when we are root and
    bubblewrap is installed; otherwise plain processes as ``run_as``."""
    if os.geteuid() == 0 and shutil.which("bwrap"):
        from mpqemu_mgmt.orchestrate.confined import ConfinedLauncher

        return ConfinedLauncher()
    return ProcessLauncher(run_as)


class GuestDriver(Protocol):
    name: str

    async def start(self, spec: GuestSpec) -> GuestRuntime: ...

    async def attach(self, runtime: GuestRuntime, device: DeviceSpec) -> RemoteRuntime: ...

    async def detach(self, runtime: GuestRuntime, device_id: str) -> None: ...

    async def reset(self, runtime: GuestRuntime, device_id: str | None = None) -> None: ...

    async def stop(self, runtime: GuestRuntime, force: bool = False) -> None: ...

    async def pause(self, runtime: GuestRuntime) -> None: ...

    async def resume(self, runtime: GuestRuntime) -> None: ...

    async def adopt(self, record: dict[str, object]) -> GuestRuntime: ...

    def refuse_migration(self, spec: GuestSpec, action: str) -> None: ...


class _BaseDriver:
    name = "base"
    _dir_mode = 0o700

    def __init__(self, state_root: str | Path, *, launcher: RemoteLauncher | None = None,
                 before_step: StepHook | None = None) -> None:
        self.state_root = Path(state_root)
        self.launcher: RemoteLauncher = launcher or ProcessLauncher()
        self.before_step = before_step
        self._channels: dict[str, MonitorChannel] = {}
        self.last_report: RunReport | None = None

    # -- hooks for subclasses --------------------------------------------------------------
    async def _connect(self, runtime: GuestRuntime) -> MonitorChannel:
        raise NotImplementedError

    def _owner(self) -> tuple[int, int] | None:
        return None

    # -- shared lifecycle -------------------------------------------------------------------
    def state_dir(self, spec: GuestSpec) -> str:
        return str(self.state_root / spec.name)

    def refuse_migration(self, spec: GuestSpec, action: str) -> None:
        plans.refuse(spec, action)

    def plan(self, runtime_or_spec: GuestRuntime | GuestSpec, action: str, **kw: object) -> Plan:
        # the launcher renders the remote argv it will execute, so the plan shows what runs
        if isinstance(runtime_or_spec, GuestRuntime):
            return plans.plan_for(runtime_or_spec.spec, action, state_dir=runtime_or_spec.state_dir,
                                  placements=runtime_or_spec.placements(),
                                  remote_command=self.launcher.command, **kw)  # type: ignore[arg-type]
        return plans.plan_for(runtime_or_spec, action, state_dir=self.state_dir(runtime_or_spec),
                              remote_command=self.launcher.command, **kw)  # type: ignore[arg-type]

    async def _run(self, runtime: GuestRuntime, plan: Plan, devices: dict[str, DeviceSpec],
                   channel: MonitorChannel | None) -> Runner:
        runner = Runner(runtime, self._vm_ops(), self.launcher, channel, devices,
                        before_step=self.before_step)
        self.last_report = await runner.run(plan)
        return runner

    def _vm_ops(self) -> _VmOps:
        return _VmOps(self)

    async def start(self, spec: GuestSpec) -> GuestRuntime:
        check_fd_passing(spec)
        await capabilities.check(spec.qemu_binary, spec.devices)
        state_dir = self.state_dir(spec)
        prepare_dir(state_dir, self._owner(), self._dir_mode)
        paths = GuestPaths(state_dir)
        runtime = GuestRuntime(spec=spec, driver=self.name, state_dir=state_dir, pid=0,
                               qmp_path=paths.qmp if self.name == "direct" else None,
                               console_log=paths.console)
        plan = self.plan(spec, "start")
        runner = await self._run(runtime, plan, {d.id: d for d in spec.devices}, None)
        assert runner.channel is not None
        self._channels[spec.name] = runner.channel
        return runtime

    async def channel(self, runtime: GuestRuntime) -> MonitorChannel:
        chan = self._channels.get(runtime.name)
        if chan is None:
            chan = await self._connect(runtime)
            self._channels[runtime.name] = chan
        return chan

    async def attach(self, runtime: GuestRuntime, device: DeviceSpec) -> RemoteRuntime:
        plan = self.plan(runtime, "attach", device=device)
        await capabilities.check(runtime.spec.qemu_binary, [device])
        devices = {d.id: d for d in runtime.spec.devices} | {device.id: device}
        channel = await self.channel(runtime)
        try:
            await self._run(runtime, plan, devices, channel)
        except MpqemuError as exc:
            # A device_add that timed out can complete later (realize resumes once the hung remote is
            # killed) and the one-shot unplug of the rollback needs the guest's help. If QEMU still
            # has the device, keep it in the spec (remote-less) so a detach can remove it later.
            if await _plugged(channel, device.id) is True:
                runtime.spec = runtime.spec.with_device(device)
                exc.details["still_plugged"] = device.id
            raise
        runtime.spec = runtime.spec.with_device(device)
        return runtime.remotes[device.id]

    async def detach(self, runtime: GuestRuntime, device_id: str) -> None:
        plan = self.plan(runtime, "detach", device_id=device_id)
        channel = await self.channel(runtime)
        try:
            await self._run(runtime, plan, {d.id: d for d in runtime.spec.devices}, channel)
        except Exception:
            if await _plugged(channel, device_id) is False:
                # device_del completed, then a later step failed: the rollback stopped the remote.
                runtime.spec = runtime.spec.without_device(device_id)
            raise
        runtime.spec = runtime.spec.without_device(device_id)

    async def reset(self, runtime: GuestRuntime, device_id: str | None = None) -> None:
        plan = self.plan(runtime, "reset", device_id=device_id)
        channel = await self.channel(runtime)
        try:
            await self._run(runtime, plan, {d.id: d for d in runtime.spec.devices}, channel)
        except Exception:
            if device_id is not None and await _plugged(channel, device_id) is False:
                # The unplug half completed and the plug half rolled back: the device is gone.
                runtime.spec = runtime.spec.without_device(device_id)
            raise

    async def pause(self, runtime: GuestRuntime) -> None:
        await (await self.channel(runtime)).execute("stop", timeout=plans.QMP_TIMEOUT)

    async def resume(self, runtime: GuestRuntime) -> None:
        await (await self.channel(runtime)).execute("cont", timeout=plans.QMP_TIMEOUT)

    async def stop(self, runtime: GuestRuntime, force: bool = False) -> None:
        plan = self.plan(runtime, "stop", force=force)
        channel: MonitorChannel | None = None
        with contextlib.suppress(Exception):
            channel = await self.channel(runtime)
        try:
            await self._run(runtime, plan, {d.id: d for d in runtime.spec.devices}, channel)
        finally:
            await close_quietly(self._channels.pop(runtime.name, None))
            # Whatever happened above, no remote outlives its guest.
            for remote in list(runtime.remotes.values()):
                with contextlib.suppress(Exception):
                    await self.launcher.stop(remote, timeout=0.0, force=True)
            runtime.remotes.clear()
            close_pidfd_main(runtime)

    async def adopt(self, record: dict[str, object]) -> GuestRuntime:
        runtime = GuestRuntime.from_record(dict(record))
        for remote in runtime.remotes.values():
            if pid_alive(remote.pid):
                remote.pidfd = open_pidfd(remote.pid)
        if runtime.pid and pid_alive(runtime.pid):
            runtime.pidfd = open_pidfd(runtime.pid)
        await self.channel(runtime)
        return runtime

    # -- main QEMU (called through _VmOps by the runner) ---------------------------------------
    async def launch_vm(self, step: Step, runtime: GuestRuntime) -> MonitorChannel:
        raise NotImplementedError

    async def stop_vm(self, step: Step, runtime: GuestRuntime, channel: MonitorChannel | None) -> None:
        raise NotImplementedError


class _VmOps:
    def __init__(self, driver: _BaseDriver) -> None:
        self._driver = driver

    async def launch_vm(self, step: Step, runtime: GuestRuntime) -> MonitorChannel:
        return await self._driver.launch_vm(step, runtime)

    async def stop_vm(self, step: Step, runtime: GuestRuntime, channel: MonitorChannel | None) -> None:
        await self._driver.stop_vm(step, runtime, channel)


async def _plugged(channel: MonitorChannel, device_id: str) -> bool | None:
    """Does QEMU still have ``/machine/peripheral/<id>``? None when it cannot tell."""
    try:
        items = await channel.execute("qom-list", {"path": "/machine/peripheral"}, timeout=5.0)
    except Exception:
        return None
    if not isinstance(items, list):
        return None
    return any(isinstance(i, dict) and i.get("name") == device_id for i in items)


def close_pidfd_main(runtime: GuestRuntime) -> None:
    if runtime.pidfd is not None:
        with contextlib.suppress(OSError):
            os.close(runtime.pidfd)
        runtime.pidfd = None


class DirectDriver(_BaseDriver):
    """The main QEMU is our child process, unprivileged, sandboxed, QMP on a socket we own."""

    name = "direct"

    def __init__(self, state_root: str | Path, *, run_as: str | None = "nobody",
                 launcher: RemoteLauncher | None = None, before_step: StepHook | None = None) -> None:
        super().__init__(state_root, launcher=launcher or default_launcher(run_as), before_step=before_step)
        self.run_as = run_as
        self._user = resolve_user(run_as)

    def _owner(self) -> tuple[int, int] | None:
        return self._user

    async def start(self, spec: GuestSpec) -> GuestRuntime:
        if self._user is not None:
            # QEMU drops to run_as before it opens anything: refuse now, with the reason, rather
            # than let it fail on "could not load kernel" or a socket it cannot bind.
            uid, gid = self._user
            self.state_root.mkdir(parents=True, exist_ok=True)
            checks = [(str(self.state_root), os.X_OK)]
            if spec.boot is not None:
                checks += [(p, os.R_OK) for p in (spec.boot.kernel, spec.boot.initrd) if p]
            for path, need in checks:
                why = unreachable_for(path, uid, gid, need=need)
                if why is not None:
                    raise RefusedError(
                        f"guest {spec.name!r}: QEMU runs as {self.run_as!r} (uid {uid}) and cannot use "
                        f"{path}: {why}", guest=spec.name, path=path, user=self.run_as)
        return await super().start(spec)

    async def _connect(self, runtime: GuestRuntime) -> MonitorChannel:
        if runtime.qmp_path is None:
            raise NotFoundError(f"guest {runtime.name!r} has no QMP socket", guest=runtime.name)
        return await QmpChannel.connect(runtime.qmp_path, timeout=5.0)

    async def launch_vm(self, step: Step, runtime: GuestRuntime) -> MonitorChannel:
        paths = GuestPaths(runtime.state_dir)
        for stale in (paths.qmp,):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)
        # QEMU opens the console log after dropping to run_as: create it for that user.
        Path(paths.console).touch()
        if self._user is not None:
            os.chown(paths.console, *self._user)
        kw: dict[str, object] = {}
        if self._user is not None:
            kw = {"user": self._user[0], "group": self._user[1], "extra_groups": []}
        with open(f"{runtime.state_dir}/qemu.log", "ab") as log:
            proc = subprocess.Popen(  # type: ignore[call-overload]
                list(step.argv), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True, **kw)
        runtime.pid = proc.pid
        runtime.pidfd = open_pidfd(proc.pid)
        try:
            await wait_for_socket(paths.qmp, proc.pid, f"{runtime.state_dir}/qemu.log", step.timeout,
                                  f"QEMU for {runtime.name}")
            return await QmpChannel.connect(paths.qmp, timeout=step.timeout)
        except BaseException:
            await terminate(proc.pid, runtime.pidfd, grace=0.5)
            close_pidfd_main(runtime)
            raise

    async def stop_vm(self, step: Step, runtime: GuestRuntime, channel: MonitorChannel | None) -> None:
        pid = runtime.pid
        if not step.force and channel is not None and pid_alive(pid):
            with contextlib.suppress(Exception):
                await channel.execute("system_powerdown", timeout=5.0)
                await wait_exit(pid, runtime.pidfd, step.timeout)
        if channel is not None and pid_alive(pid):
            with contextlib.suppress(Exception):
                await channel.execute("quit", timeout=5.0)
        await close_quietly(channel)
        self._channels.pop(runtime.name, None)
        if not await wait_exit(pid, runtime.pidfd, 5.0):
            await terminate(pid, runtime.pidfd, grace=2.0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(GuestPaths(runtime.state_dir).qmp)


class LibvirtDriver(_BaseDriver):
    """libvirtd runs the main QEMU; we define the domain, start it paused and plug through it."""

    name = "libvirt"
    _dir_mode = 0o711

    def __init__(self, state_root: str | Path, *, run_as: str | None = "nobody",
                 launcher: RemoteLauncher | None = None, before_step: StepHook | None = None,
                 start_tokens: str | Path | None = None) -> None:
        super().__init__(state_root, launcher=launcher or default_launcher(run_as), before_step=before_step)
        self._user = resolve_user(run_as)
        #: Where the libvirt hook looks for "our service is starting <name>" (hook.py token_valid):
        #: the hook refuses a plain ``virsh start`` of our guests without one.
        self.start_tokens = Path(start_tokens) if start_tokens is not None else None
        from mpqemu_mgmt.domain.libvirt_host import LibvirtHost as host_cls

        self._hosts: dict[str, LibvirtHost] = {}
        self._host_cls = host_cls
        self._bound: dict[str, LibvirtHost] = {}  # the connection each guest's channel uses

    def _owner(self) -> tuple[int, int] | None:
        return self._user

    def host(self, uri: str) -> LibvirtHost:
        host = self._hosts.get(uri)
        if host is not None and not host.alive():
            # libvirtd restarted under running guests (its reconnect hook let them live): open a
            # fresh connection; channel() rebuilds the channels bound to the dead one.
            host.close()
            host = None
        if host is None:
            host = self._hosts[uri] = self._host_cls(uri)
        return host

    async def channel(self, runtime: GuestRuntime) -> MonitorChannel:
        host = self.host(runtime.spec.uri)
        chan = self._channels.get(runtime.name)
        if chan is not None and self._bound.get(runtime.name, host) is not host:
            # bound to a connection libvirtd dropped: look the domain up again and re-register
            # for its QMP events (DEVICE_DELETED) on the new connection
            self._channels.pop(runtime.name, None)
            await close_quietly(chan)
        chan = await super().channel(runtime)
        self._bound[runtime.name] = host
        return chan

    def _guest(self, runtime: GuestRuntime) -> LibvirtGuest:
        guest = self.host(runtime.spec.uri).lookup(runtime.name)
        if guest is None:
            raise NotFoundError(f"libvirt has no domain {runtime.name!r}", guest=runtime.name)
        return guest

    async def _connect(self, runtime: GuestRuntime) -> MonitorChannel:
        guest = await asyncio.to_thread(self._guest, runtime)
        return LibvirtChannel(guest)

    async def launch_vm(self, step: Step, runtime: GuestRuntime) -> MonitorChannel:
        from mpqemu_mgmt.domain.designer import design

        dom = design(runtime.spec, state_dir=runtime.state_dir)
        host = self._bound[runtime.name] = self.host(runtime.spec.uri)
        existing = await asyncio.to_thread(host.lookup, runtime.name)
        if existing is not None:
            # Redefining under the same name needs the same uuid, or libvirt refuses.
            dom.uuid = await asyncio.to_thread(existing.uuid)
        guest = await asyncio.to_thread(host.define_validated, dom.to_xml())
        token = None
        if self.start_tokens is not None:
            self.start_tokens.mkdir(parents=True, exist_ok=True)
            token = self.start_tokens / runtime.name
            token.write_text(f"{os.getpid()}\n")
        try:
            await asyncio.wait_for(asyncio.to_thread(guest.create_paused), step.timeout)
            runtime.pid = guest.pid()
            runtime.pidfd = open_pidfd(runtime.pid) if runtime.pid else None
            return LibvirtChannel(guest)
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(guest.destroy)
            raise
        finally:
            if token is not None:
                token.unlink(missing_ok=True)

    async def stop_vm(self, step: Step, runtime: GuestRuntime, channel: MonitorChannel | None) -> None:
        guest = await asyncio.to_thread(self._guest, runtime)
        await close_quietly(channel)
        self._channels.pop(runtime.name, None)
        if not step.force and await asyncio.to_thread(guest.is_active):
            with contextlib.suppress(Exception):
                await asyncio.to_thread(guest.shutdown)
                loop = asyncio.get_running_loop()
                deadline = loop.time() + step.timeout
                while loop.time() < deadline and await asyncio.to_thread(guest.is_active):
                    await asyncio.sleep(0.2)
        await asyncio.to_thread(guest.destroy)
        if runtime.pid and not await wait_exit(runtime.pid, runtime.pidfd, 10.0):
            raise ProcessFailed(f"QEMU of {runtime.name} (pid {runtime.pid}) still running after destroy",
                                pid=runtime.pid)

    async def taints(self, runtime: GuestRuntime) -> list[str]:
        """libvirt's taint/deprecation messages for this guest, to show in ``status``: every guest
        we plug is tainted custom-monitor ("tainted: custom monitor control commands issued"):
        getfd and device_add go through QMP passthrough."""
        guest = await asyncio.to_thread(self._guest, runtime)
        return await asyncio.to_thread(guest.messages)

    async def undefine(self, spec: GuestSpec) -> None:
        guest = self.host(spec.uri).lookup(spec.name)
        if guest is not None:
            await asyncio.to_thread(guest.destroy)
            await asyncio.to_thread(guest.undefine)


def driver_for(spec: GuestSpec, state_root: str | Path, **kw: object) -> GuestDriver:
    """The driver a spec asks for (``driver = "direct" | "libvirt"``)."""
    if spec.driver == "libvirt":
        return LibvirtDriver(state_root, **kw)  # type: ignore[arg-type]
    if spec.driver == "direct":
        return DirectDriver(state_root, **kw)  # type: ignore[arg-type]
    raise OrchestrationError(f"unknown driver {spec.driver!r}")
