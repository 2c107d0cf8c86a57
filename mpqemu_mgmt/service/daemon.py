"""The service proper: the request handlers behind the control API, and recovery by policy.

One :class:`Daemon` per host. It owns the guest records (through the store), the drivers'
:class:`GuestRuntime` objects, the supervisor and the logs. Every mutation runs under the guest's
lock, is audited (who, what, which QMP/libvirt calls, result) and leaves the record on disk in a
state that matches the processes. Operations are idempotent: doing what is already done answers
``changed: false``. Restarting the daemon re-adopts running guests (pidfd_open + QMP reconnect)
without touching them. Must not build plans or command lines (orchestrate/) nor parse specs by
hand (domain/spec).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from mpqemu_mgmt import __version__
from mpqemu_mgmt.domain.spec import DeviceSpec, GuestSpec, device_from_dict, spec_from_dict
from mpqemu_mgmt.errors import MpqemuError, RefusedError, UsageError
from mpqemu_mgmt.orchestrate.driver import GuestDriver, driver_for
from mpqemu_mgmt.orchestrate.heartbeat import (
    Action,
    ChannelProbe,
    Emit,
    GuestCrashed,
    Health,
    OnFailure,
    PauseGuest,
    Replug,
    Role,
    Settings,
    State,
    StopGuest,
)
from mpqemu_mgmt.orchestrate.plans import RemoteCommand
from mpqemu_mgmt.orchestrate.processes import ProcessLauncher
from mpqemu_mgmt.orchestrate.runtime import GuestRuntime
from mpqemu_mgmt.procfs import proc_start_time
from mpqemu_mgmt.service.audit import AuditEntry, AuditLog
from mpqemu_mgmt.service.control import ControlServer, Peer, Progress
from mpqemu_mgmt.service.events import EventLog
from mpqemu_mgmt.service.metrics import render, write_metrics
from mpqemu_mgmt.service.paths import StatePaths
from mpqemu_mgmt.service.records import DeviceRecord, GuestRecord, ProcRecord
from mpqemu_mgmt.service.store import StateStore
from mpqemu_mgmt.service.supervisor import MAIN, Supervisor

DriverFactory = Callable[..., GuestDriver]  # (spec, state_root, before_step=...) -> driver
MUTATIONS = frozenset({"define", "undefine", "start", "stop", "attach", "detach", "reset", "shutdown"})
ACTIVE = ("running", "paused")
Args = dict[str, Any]
Result = dict[str, Any]


StepRecorder = Callable[[int, Any], None]


def service_launcher() -> Any:
    """Confined remotes that outlive the service: bwrap without ``--die-with-parent``.

    The confinement default ties a remote to the thread that launched it (PR_SET_PDEATHSIG), which
    is right for a one-shot tool but wrong here: the service's worker threads end with the service,
    and a restart must find the guests' remotes alive to re-adopt them (issue 8). Remotes are still
    reaped with their guest: on stop, on a main QEMU crash, and by the libvirt hook's release.
    None (the driver's choice) when we cannot confine (not root, or no bubblewrap).
    """
    import shutil

    if os.geteuid() != 0 or shutil.which("bwrap") is None:
        return None
    from mpqemu_mgmt.confine.profile import ConfinementProfile
    from mpqemu_mgmt.orchestrate.confined import ConfinedLauncher

    return ConfinedLauncher(replace(ConfinementProfile(), die_with_parent=False))


def service_remote_command() -> RemoteCommand:
    """How this service's launcher renders a remote's argv, for ``mpqemu-mgmt plan`` (the plan
    then shows the command the service would really execute)."""
    launcher = service_launcher()
    return launcher.command if launcher is not None else ProcessLauncher().command


def default_driver_factory(spec: GuestSpec, state_root: Path, before_step: StepRecorder | None = None
                           ) -> GuestDriver:
    launcher = service_launcher()
    if launcher is None:
        return driver_for(spec, state_root, before_step=before_step)
    return driver_for(spec, state_root, before_step=before_step, launcher=launcher)


class Daemon:
    def __init__(self, paths: StatePaths, settings: Settings | None = None,
                 driver_factory: DriverFactory = default_driver_factory,
                 metrics_file: Path | None = None) -> None:
        self.paths = paths
        self.settings = settings or Settings()
        self.driver_factory = driver_factory
        self.metrics_file = metrics_file
        self.store = StateStore(paths)
        self.events = EventLog(paths.events)
        self.audit = AuditLog(paths.audit)
        self.supervisor = Supervisor(self, self.settings)
        self.runtimes: dict[str, GuestRuntime] = {}
        self.drivers: dict[str, GuestDriver] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.server = ControlServer(paths.control, self.handle)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.stopped = asyncio.Event()
        self._calls: dict[str, list[str]] = {}  # QMP/libvirt steps run for a guest, for the audit
        self.recovery: dict[str, set[asyncio.Task[Any]]] = {}  # replug/pause/stop tasks per guest

    # -- life of the service ----------------------------------------------------------------

    async def open(self, *, serve: bool = True) -> None:
        if serve:
            self._refuse_second_service()
        for d in (self.paths.state, self.paths.run, self.paths.guests, self.paths.starting):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        # QEMU and the remotes run unprivileged and must reach their guest's directory (owned by
        # them) through ours: traverse-only, never listable.
        for d in (self.paths.state, self.paths.run, self.paths.guests):
            d.chmod(0o711)
        self.paths.starting.chmod(0o755)  # the hook reads start tokens (it runs as root anyway)
        for name in self.store.names():
            await self._reconcile(name)
        if serve:
            await self.server.start()
            self.paths.pidfile.write_text(f"{os.getpid()}\n")
        self.events.emit("service_started", "-", detail=f"pid {os.getpid()}", version=__version__)

    def _refuse_second_service(self) -> None:
        """Two services on one state directory would fight over every guest: refuse the second."""
        import socket as _socket

        path = self.paths.control
        if not path.exists():
            return
        probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return  # a stale socket from a service that died: ours to replace
        finally:
            probe.close()
        pid = self.paths.pidfile.read_text().strip() if self.paths.pidfile.exists() else "?"
        raise RefusedError(f"a service already runs on {self.paths.state} (pid {pid})", pid=pid)

    async def close(self) -> None:
        """Leave: guests, their QEMUs and remotes keep running; a restart re-adopts them."""
        await self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.supervisor.close()
        for name, rt in list(self.runtimes.items()):
            driver = self.drivers.get(name)
            chan = getattr(driver, "_channels", {}).pop(name, None) if driver is not None else None
            if chan is not None:
                with contextlib.suppress(Exception):
                    await chan.close()
            fds = [rt.pidfd, *(r.pidfd for r in rt.remotes.values())]
            for fd in fds:
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            rt.pidfd = None
            for r in rt.remotes.values():
                r.pidfd = None
        with contextlib.suppress(FileNotFoundError):
            self.paths.pidfile.unlink()
        self.events.emit("service_stopped", "-", detail=f"pid {os.getpid()}")

    def lock(self, name: str) -> asyncio.Lock:
        return self.locks.setdefault(name, asyncio.Lock())

    def driver(self, spec: GuestSpec) -> GuestDriver:
        drv = self.drivers.get(spec.name)
        if drv is None or drv.name != spec.driver:
            name = spec.name
            drv = self.drivers[name] = self.driver_factory(
                spec, self.paths.guests, before_step=lambda _i, step: self._calls.setdefault(name, []).append(
                    _describe(step)))
        return drv

    def spawn(self, coro: Awaitable[Any], name: str, guest: str | None = None) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        if guest is not None:
            group = self.recovery.setdefault(guest, set())
            group.add(task)
            task.add_done_callback(group.discard)

    async def cancel_recovery(self, guest: str) -> None:
        """An operator's stop wins over a recovery in progress (a replug may wait minutes for
        a guest that never acknowledges the unplug)."""
        me = asyncio.current_task()
        tasks = [t for t in self.recovery.get(guest, set()) if t is not me and not t.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=15.0)

    # -- records ------------------------------------------------------------------------------

    def _save(self, rec: GuestRecord) -> GuestRecord:
        rec = self.store.save(rec)
        self._write_metrics()
        return rec

    def _write_metrics(self) -> None:
        if self.metrics_file is not None:
            with contextlib.suppress(OSError):
                write_metrics(self.metrics_file, render(self.store.load_all(), self._latencies()))

    def _latencies(self) -> dict[tuple[str, str], float]:
        return {k: v for k, v in self.supervisor.latencies().items()}

    def _record_from_runtime(self, rec: GuestRecord, rt: GuestRuntime, state: str) -> GuestRecord:
        """The record of a live guest. Its definition keeps every device of ``rec`` even when the
        runtime lost one (a replug whose plug half failed): only ``detach`` removes a device."""
        spec = rt.spec
        live = {d.id for d in spec.devices}
        with contextlib.suppress(MpqemuError):
            for d in self._spec(rec).devices:
                if d.id not in live:
                    spec = spec.with_device(d)
        devices = []
        for dev in spec.devices:
            old = rec.device(dev.id)
            remote = rt.remotes.get(dev.id)
            w = self.supervisor.get(rec.name, dev.id)
            proc = None
            if remote is not None:
                proc = ProcRecord(remote.pid, proc_start_time(remote.pid) or 0, remote.qmp_path,
                                  remote.log_path)
            devices.append(DeviceRecord(
                id=dev.id, model=dev.model, backend=dev.backend, on_failure=dev.on_failure, proc=proc,
                health=w.health.state.value if w is not None else (old.health if old else "starting"),
                restarts=w.health.restarts if w is not None else (old.restarts if old else 0),
                confinement=dict(remote.confinement) if remote is not None else {},
                qdev_id=dev.id))
        main = (ProcRecord(rt.pid, proc_start_time(rt.pid) or 0, rt.qmp_path, rt.console_log)
                if rt.pid else None)
        return replace(rec, spec=spec.to_dict(), state=state, driver=rt.driver, main=main,
                       devices=tuple(devices), driver_data=rt.to_record())

    def _spec(self, rec: GuestRecord) -> GuestSpec:
        return spec_from_dict(rec.spec, f"state:{rec.name}")

    # -- control API --------------------------------------------------------------------------

    async def handle(self, command: str, args: dict[str, Any], peer: Peer, progress: Progress) -> Any:
        method = getattr(self, f"cmd_{command}", None)
        if method is None:
            raise UsageError(f"unknown command {command!r}", command=command)
        if command not in MUTATIONS:
            return await method(args, progress)
        entry = self.audit.begin(command, args, peer.uid, peer.pid)
        try:
            result = await method(args, progress, entry)
        except MpqemuError as exc:
            entry.result, entry.error = "error", exc.message
            raise
        except Exception as exc:
            entry.result, entry.error = "error", repr(exc)
            raise
        else:
            if isinstance(result, dict) and result.get("changed") is False:
                entry.result = "unchanged"
            return result
        finally:
            self._note_calls(entry, args.get("name"))
            self.audit.write(entry)

    def _note_calls(self, entry: AuditEntry, name: Any) -> None:
        """Move the QMP/libvirt steps the driver ran for ``name`` into the audit entry."""
        if name:
            entry.calls.extend(self._calls.pop(str(name), []))

    async def cmd_ping(self, args: Args, progress: Progress) -> Result:
        return {"pid": os.getpid(), "version": __version__, "guests": len(self.store.names()),
                "state_dir": str(self.paths.state)}

    async def cmd_list(self, args: dict[str, Any], progress: Progress) -> list[dict[str, Any]]:
        return [self._live(r).summary() for r in self.store.load_all()]

    async def cmd_status(self, args: Args, progress: Progress) -> Result:
        return self._live(self.store.load(_name(args))).status()

    def _live(self, rec: GuestRecord) -> GuestRecord:
        """The record with the supervisor's current health folded in."""
        devices = []
        for d in rec.devices:
            w = self.supervisor.get(rec.name, d.id)
            devices.append(replace(d, health=w.health.state.value, restarts=w.health.restarts) if w else d)
        return replace(rec, devices=tuple(devices))

    async def cmd_define(self, args: Args, progress: Progress, audit: AuditEntry) -> Result:
        raw = args.get("spec")
        if not isinstance(raw, dict):
            raise UsageError("define needs a spec")
        spec = spec_from_dict(raw, str(args.get("source", "<spec>")))
        async with self.lock(spec.name):
            if self.store.exists(spec.name):
                rec = self.store.load(spec.name)
                if rec.spec == spec.to_dict():
                    return {"name": spec.name, "changed": False, "state": rec.state}
                if rec.state in ACTIVE:
                    raise RefusedError(f"guest {spec.name!r} is {rec.state}; stop it before redefining it",
                                       guest=spec.name)
                rec = replace(rec, spec=spec.to_dict(), driver=spec.driver,
                              devices=tuple(DeviceRecord(d.id, d.model, d.backend, d.on_failure)
                                            for d in spec.devices))
            else:
                rec = GuestRecord(name=spec.name, spec=spec.to_dict(), driver=spec.driver,
                                  devices=tuple(DeviceRecord(d.id, d.model, d.backend, d.on_failure)
                                                for d in spec.devices))
            self._save(rec)
            self.events.emit("defined", spec.name, detail=f"{len(spec.devices)} device(s), {spec.driver}")
            return {"name": spec.name, "changed": True, "state": rec.state}

    async def cmd_undefine(self, args: Args, progress: Progress, audit: AuditEntry) -> Result:
        name = _name(args)
        async with self.lock(name):
            if not self.store.exists(name):
                return {"name": name, "changed": False}
            rec = self.store.load(name)
            if rec.state in ACTIVE or name in self.runtimes:
                raise RefusedError(f"guest {name!r} is {rec.state}; stop it first", guest=name)
            drv = self.driver(self._spec(rec))
            undefine = getattr(drv, "undefine", None)
            if undefine is not None:
                audit.calls.append("libvirt undefine")
                await undefine(self._spec(rec))
            self.store.delete(name)
            self.drivers.pop(name, None)
            self.events.emit("undefined", name)
            return {"name": name, "changed": True}

    async def cmd_start(self, args: Args, progress: Progress, audit: AuditEntry) -> Result:
        name = _name(args)
        async with self.lock(name):
            rec = self.store.load(name)
            rt0 = self.runtimes.get(name)
            if rec.state == "running" and rt0 is not None:
                return {"name": name, "changed": False, "state": rec.state}
            if rec.state == "paused" and rt0 is not None:
                # ensure running: a guest paused (by an operator or by on_failure=pause) resumes
                await progress(f"resuming {name}")
                await self.driver(rt0.spec).resume(rt0)
                audit.calls.append(f"{rt0.driver} qmp cont")
                self._save(replace(self._record_from_runtime(rec, rt0, "running"), reason=""))
                self.events.emit("resumed", name)
                return {"name": name, "changed": True, "state": "running", "pid": rt0.pid}
            spec = self._spec(rec)
            drv = self.driver(spec)
            await progress(f"starting {name} ({spec.driver}) with {len(spec.devices)} device(s)")
            rec = self._save(replace(rec, state="starting", reason=""))
            self.events.emit("starting", name)
            token = self.paths.starting / name
            token.write_text(f"{os.getpid()}\n")  # the libvirt hook's proof that we are starting it
            try:
                rt = await drv.start(spec)
            except MpqemuError as exc:
                self._save(replace(rec, state="failed", reason=exc.message))
                self.events.emit("start_failed", name, detail=exc.message)
                raise
            finally:
                with contextlib.suppress(FileNotFoundError):
                    token.unlink()
            self.runtimes[name] = rt
            self._watch_guest(rt)
            rec = self._save(self._record_from_runtime(rec, rt, "running"))
            for dev in rt.spec.devices:
                remote = rt.remotes.get(dev.id)
                if remote is not None:
                    await progress(f"device {dev.id} ({dev.model}, {dev.backend}) pid {remote.pid}")
            self.events.emit("running", name, detail=f"main pid {rt.pid}")
            return {"name": name, "changed": True, "state": "running", "pid": rt.pid}

    async def cmd_stop(self, args: Args, progress: Progress, audit: AuditEntry) -> Result:
        name = _name(args)
        force = bool(args.get("force", False))
        await self.cancel_recovery(name)
        async with self.lock(name):
            rec = self.store.load(name)
            rt = self.runtimes.get(name)
            if rt is None:
                if rec.state in ("defined", "stopped"):
                    return {"name": name, "changed": False, "state": rec.state}
                # crashed/failed/starting leftovers: make sure nothing of it survives
                self._reap_record(rec)
                self._save(_down(rec, "stopped", ""))
                self.events.emit("stopped", name, detail=f"was {rec.state}")
                return {"name": name, "changed": rec.state != "stopped", "state": "stopped"}
            await progress(f"stopping {name}{' (force)' if force else ''}")
            await self._stop_runtime(name, rt, force)
            self.events.emit("stopped", name, detail="force" if force else "powerdown")
            return {"name": name, "changed": True, "state": "stopped"}

    async def _stop_runtime(self, name: str, rt: GuestRuntime, force: bool) -> None:
        self.supervisor.unwatch_guest(name)
        rec = self.store.load(name)
        try:
            await self.driver(rt.spec).stop(rt, force=force)
        finally:
            self.runtimes.pop(name, None)
            self._save(replace(rec, state="stopped", main=None, reason="",
                               devices=tuple(replace(d, proc=None, health="stopped") for d in rec.devices)))

    async def cmd_attach(self, args: Args, progress: Progress, audit: AuditEntry) -> Result:
        name = _name(args)
        raw = args.get("device")
        if not isinstance(raw, dict):
            raise UsageError("attach needs a device table")
        dev = device_from_dict(raw, "<attach>")
        async with self.lock(name):
            rec = self.store.load(name)
            spec = self._spec(rec)
            existing = next((d for d in spec.devices if d.id == dev.id), None)
            if existing is not None:
                if existing == dev:
                    return {"name": name, "device": dev.id, "changed": False}
                raise UsageError(f"guest {name!r} already has a different device {dev.id!r}", device=dev.id)
            rt = self.runtimes.get(name)
            if rt is None:
                new = spec.with_device(dev)
                self._save(replace(rec, spec=new.to_dict(),
                                   devices=(*rec.devices, DeviceRecord(dev.id, dev.model, dev.backend,
                                                                       dev.on_failure))))
                self.events.emit("attached", name, dev.id, "defined; plugged at next start")
                return {"name": name, "device": dev.id, "changed": True, "plugged": False}
            await progress(f"hot-plugging {dev.id} ({dev.model}, {dev.backend})")
            remote = await self.driver(rt.spec).attach(rt, dev)
            self._watch_device(rt, dev)
            self._save(self._record_from_runtime(rec, rt, rec.state))
            self.events.emit("attached", name, dev.id, f"pid {remote.pid}")
            return {"name": name, "device": dev.id, "changed": True, "plugged": True, "pid": remote.pid}

    async def cmd_detach(self, args: Args, progress: Progress, audit: AuditEntry) -> Result:
        name = _name(args)
        dev_id = str(args.get("id", ""))
        async with self.lock(name):
            rec = self.store.load(name)
            spec = self._spec(rec)
            if not any(d.id == dev_id for d in spec.devices):
                return {"name": name, "device": dev_id, "changed": False}
            rt = self.runtimes.get(name)
            if rt is None:
                self._save(replace(rec, spec=spec.without_device(dev_id).to_dict()).without_device(dev_id))
            else:
                await progress(f"hot-unplugging {dev_id} (waiting for the guest to acknowledge)")
                self.supervisor.unwatch(name, dev_id)
                try:
                    await self.driver(rt.spec).detach(rt, dev_id)
                except MpqemuError:
                    if dev_id in rt.remotes:
                        self._watch_device(rt, rt.spec.device(dev_id))  # still plugged: keep watching
                    raise
                gone = replace(rec, spec=spec.without_device(dev_id).to_dict()).without_device(dev_id)
                self._save(self._record_from_runtime(gone, rt, rec.state))
            self.events.emit("detached", name, dev_id)
            return {"name": name, "device": dev_id, "changed": True}

    async def cmd_reset(self, args: Args, progress: Progress, audit: AuditEntry) -> Result:
        name = _name(args)
        dev_id = args.get("id")
        async with self.lock(name):
            rec = self.store.load(name)
            rt = self.runtimes.get(name)
            if rt is None:
                raise RefusedError(f"guest {name!r} is not running", guest=name, state=rec.state)
            drv = self.driver(rt.spec)
            if dev_id is None:
                await progress(f"system_reset of {name}")
                await drv.reset(rt)
                self.events.emit("reset", name)
                return {"name": name, "changed": True}
            rt.spec.device(str(dev_id))
            await progress(f"hard reset of {dev_id}: unplug, fresh remote, plug")
            w = self.supervisor.unwatch(name, str(dev_id))
            try:
                await drv.reset(rt, str(dev_id))
            finally:
                if str(dev_id) in rt.remotes:
                    # a fresh remote: health starts over (a FAILED device is given another chance),
                    # the restart count is kept
                    fresh = replace(w.health, state=State.STARTING, misses=0, consecutive=0,
                                    healthy_since=None) if w else None
                    self._watch_device(rt, rt.spec.device(str(dev_id)), fresh)
                self._save(self._record_from_runtime(rec, rt, rec.state))
            self.events.emit("reset", name, str(dev_id), f"pid {rt.remotes[str(dev_id)].pid}")
            return {"name": name, "device": dev_id, "changed": True}

    async def cmd_shutdown(self, args: Args, progress: Progress, audit: AuditEntry) -> Result:
        """Stop the service (not the guests)."""
        asyncio.get_running_loop().call_later(0.05, self.stopped.set)
        return {"changed": True, "pid": os.getpid()}

    # -- supervision --------------------------------------------------------------------------

    def _watch_guest(self, rt: GuestRuntime, gone: frozenset[str] = frozenset()) -> None:
        name = rt.name
        drv = self.driver(rt.spec)

        async def execute(command: str, timeout: float) -> object:
            chan = await drv.channel(rt)  # type: ignore[attr-defined]
            return await chan.execute(command, timeout=timeout)

        if rt.pid:
            self.supervisor.watch(name, MAIN, pid=rt.pid, pidfd=rt.pidfd, qmp=None, role=Role.MAIN,
                                  probe=ChannelProbe(execute, self.settings.timeout))
        for dev in rt.spec.devices:
            if dev.id in rt.remotes:
                self._watch_device(rt, dev, gone=dev.id in gone)

    def _watch_device(self, rt: GuestRuntime, dev: DeviceSpec, health: Health | None = None,
                      gone: bool = False) -> None:
        remote = rt.remotes[dev.id]
        rec_dev = self.store.load(rt.name).device(dev.id) if self.store.exists(rt.name) else None
        if gone and health is None:
            # it died while the service was away: start from healthy so the exit counts as a crash
            health = Health(role=Role.REMOTE, on_failure=OnFailure(dev.on_failure), state=State.HEALTHY,
                            restarts=rec_dev.restarts if rec_dev else 0)
        self.supervisor.watch(rt.name, dev.id, pid=remote.pid, pidfd=remote.pidfd, qmp=remote.qmp_path,
                              role=Role.REMOTE, on_failure=dev.on_failure,
                              restarts=rec_dev.restarts if rec_dev else 0, health=health, gone=gone)

    def on_transition(self, guest: str, subject: str, health: Health, event: Emit) -> None:
        w = self.supervisor.get(guest, subject)
        data: dict[str, Any] = {"state": health.state.value, "restarts": health.restarts}
        if w is not None:
            data["pid"] = w.pid
        self.events.emit(event.kind, guest, None if subject == MAIN else subject, event.detail, **data)
        if subject != MAIN and self.store.exists(guest):
            rec = self.store.load(guest)
            dev = rec.device(subject)
            if dev is not None:
                self._save(rec.with_device(replace(dev, health=health.state.value, restarts=health.restarts)))

    def on_action(self, guest: str, subject: str, health: Health, action: Action) -> None:
        if isinstance(action, Replug):
            self.spawn(self._replug(guest, subject, action), f"replug:{guest}:{subject}", guest)
        elif isinstance(action, PauseGuest):
            self.spawn(self._pause(guest, subject, action.reason), f"pause:{guest}", guest)
        elif isinstance(action, StopGuest):
            self.spawn(self._stop_on_failure(guest, subject, action.reason), f"stop:{guest}")
        elif isinstance(action, GuestCrashed):
            self.spawn(self._crashed(guest, action.reason), f"crashed:{guest}")
        # Kill is done by the supervisor itself; its event came through on_transition.

    async def _replug(self, guest: str, dev_id: str, action: Replug) -> None:
        if action.delay > 0:
            await asyncio.sleep(action.delay)
        async with self.lock(guest):
            rt = self.runtimes.get(guest)
            if rt is None:
                return
            drv = self.driver(rt.spec)
            rec = self.store.load(guest)
            dev = next((d for d in self._spec(rec).devices if d.id == dev_id), None)
            if dev is None:
                return
            entry = self.audit.begin("replug", {"name": guest, "id": dev_id, "attempt": action.attempt},
                                     uid=os.geteuid(), pid=os.getpid())
            try:
                if any(d.id == dev_id for d in rt.spec.devices):
                    await drv.reset(rt, dev_id)  # unplug the dead proxy, fresh remote, plug
                else:
                    await drv.attach(rt, dev)  # an earlier attempt got as far as the unplug
            except MpqemuError as exc:
                entry.result, entry.error = "error", exc.message
                self._note_calls(entry, guest)
                self.audit.write(entry)
                self.supervisor.replug_failed(guest, dev_id, exc.message)
                self._save(self._record_from_runtime(rec, rt, rec.state))
                return
            self._note_calls(entry, guest)
            self.audit.write(entry)
            remote = rt.remotes[dev_id]
            self.supervisor.replugged(guest, dev_id, pid=remote.pid, pidfd=remote.pidfd, qmp=remote.qmp_path)
            self._save(self._record_from_runtime(rec, rt, rec.state))

    async def _pause(self, guest: str, dev_id: str, reason: str) -> None:
        async with self.lock(guest):
            rt = self.runtimes.get(guest)
            if rt is None:
                return
            entry = self.audit.begin("pause", {"name": guest, "id": dev_id, "reason": reason},
                                     uid=os.geteuid(), pid=os.getpid())
            entry.calls.append(f"{rt.driver} qmp stop")
            try:
                await self.driver(rt.spec).pause(rt)
            except MpqemuError as exc:
                entry.result, entry.error = "error", exc.message
            self.audit.write(entry)
            rec = self.store.load(guest)
            self._save(replace(self._record_from_runtime(rec, rt, "paused"), reason=f"{dev_id}: {reason}"))
            self.events.emit("paused", guest, dev_id, reason)

    async def _stop_on_failure(self, guest: str, dev_id: str, reason: str) -> None:
        await self.cancel_recovery(guest)
        async with self.lock(guest):
            rt = self.runtimes.get(guest)
            if rt is None:
                return
            entry = self.audit.begin("stop", {"name": guest, "force": True, "on_failure_of": dev_id,
                                              "reason": reason}, uid=os.geteuid(), pid=os.getpid())
            try:
                await self._stop_runtime(guest, rt, force=True)
            except MpqemuError as exc:
                entry.result, entry.error = "error", exc.message
            self._note_calls(entry, guest)
            self.audit.write(entry)
            self.events.emit("stopped", guest, dev_id, f"on_failure=stop: {reason}")

    async def _crashed(self, guest: str, reason: str) -> None:
        await self.cancel_recovery(guest)
        async with self.lock(guest):
            rt = self.runtimes.pop(guest, None)
            self.supervisor.unwatch_guest(guest)
            rec = self.store.load(guest)
            self._reap_record(rec)
            if rt is not None:
                with contextlib.suppress(Exception):
                    await self.driver(rt.spec).stop(rt, force=True)  # closes channels, reaps what is left
            self._save(replace(rec, state="crashed", reason=f"main QEMU {reason}", main=None,
                               devices=tuple(replace(d, proc=None, health="stopped") for d in rec.devices)))
            self.events.emit("crashed", guest, detail=f"main QEMU {reason}; remotes reaped")

    def _reap_record(self, rec: GuestRecord) -> None:
        """SIGKILL every recorded process of ``rec`` that is still the same process."""
        procs = [d.proc for d in rec.devices if d.proc] + ([rec.main] if rec.main else [])
        for proc in procs:
            st = proc_start_time(proc.pid)
            if st is None or (proc.start_time and st != proc.start_time):
                continue
            with contextlib.suppress(OSError):
                fd = os.pidfd_open(proc.pid)
                try:
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
                finally:
                    os.close(fd)

    # -- re-adoption --------------------------------------------------------------------------

    async def _reconcile(self, name: str) -> None:
        """At service start: adopt a guest that is still running, or record that it is gone."""
        rec = self.store.load(name)
        if rec.state not in (*ACTIVE, "starting"):
            return
        main_alive = rec.main is not None and _same_process(rec.main)
        if rec.state == "starting" or not main_alive or not rec.driver_data:
            self._reap_record(rec)
            state = "crashed" if rec.state != "starting" else "failed"
            reason = "main QEMU gone while the service was down" if state == "crashed" else \
                "the service died during start"
            self._save(replace(rec, state=state, reason=reason, main=None,
                               devices=tuple(replace(d, proc=None, health="stopped") for d in rec.devices)))
            self.events.emit(state, name, detail=reason)
            return
        spec = self._spec(rec)
        try:
            rt = await self.driver(spec).adopt(rec.driver_data)
        except MpqemuError as exc:
            self.events.emit("adopt_failed", name, detail=exc.message)
            self._save(replace(rec, reason=f"re-adoption failed: {exc.message}"))
            return
        self.runtimes[name] = rt
        # A remote that died while we were away is reported exited at once, so its on_failure runs.
        gone = frozenset(d.id for d in rec.devices if d.proc is not None and not _same_process(d.proc))
        self._watch_guest(rt, gone)
        self._save(self._record_from_runtime(rec, rt, rec.state))
        self.events.emit("adopted", name, detail=f"main pid {rt.pid}, {len(rt.remotes)} remote(s)")


def _down(rec: GuestRecord, state: str, reason: str) -> GuestRecord:
    """``rec`` with no process left: the state after a stop, a crash or a failed start."""
    return replace(rec, state=state, reason=reason, main=None,
                   devices=tuple(replace(d, proc=None, health="stopped") for d in rec.devices))


def _same_process(proc: ProcRecord) -> bool:
    st = proc_start_time(proc.pid)
    return st is not None and (not proc.start_time or st == proc.start_time)


def _name(args: dict[str, Any]) -> str:
    name = args.get("name")
    if not isinstance(name, str) or not name:
        raise UsageError("a guest name is required")
    return name


def _describe(step: Any) -> str:
    """One audit line for a plan step: ``qmp device_add {...}``, ``launch_remote edu0`` ..."""
    import json

    op = getattr(getattr(step, "op", None), "value", "step")
    parts = [str(op)]
    if getattr(step, "command", None):
        parts.append(str(step.command))
    if getattr(step, "arguments", None):
        parts.append(json.dumps(dict(step.arguments), sort_keys=True, default=str))
    elif getattr(step, "device", None):
        parts.append(str(step.device))
    return " ".join(parts)[:300]


async def serve(paths: StatePaths, settings: Settings | None = None, metrics_file: Path | None = None,
                ready: Callable[[Daemon], None] | None = None, metrics_listen: str | None = None) -> None:
    """``mpqemu-mgmt serve``: run until SIGTERM/SIGINT or a ``shutdown`` request."""
    daemon = Daemon(paths, settings, metrics_file=metrics_file)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.stopped.set)
    await daemon.open()
    endpoint = None
    if metrics_listen:
        from mpqemu_mgmt.service.metrics import MetricsEndpoint

        host, _, port = metrics_listen.rpartition(":")
        endpoint = MetricsEndpoint(host or "127.0.0.1", int(port),
                                   lambda: render(daemon.store.load_all(), daemon._latencies()))
        await endpoint.start()
    if ready is not None:
        ready(daemon)
    metrics_task = None
    if metrics_file is not None:
        async def tick() -> None:
            while True:
                daemon._write_metrics()
                await asyncio.sleep(max(1.0, daemon.settings.interval * 2))
        metrics_task = asyncio.create_task(tick())
    try:
        await daemon.stopped.wait()
    finally:
        if metrics_task is not None:
            metrics_task.cancel()
        if endpoint is not None:
            await endpoint.close()
        await daemon.close()


__all__ = ["Daemon", "serve"]
