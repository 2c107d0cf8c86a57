"""Execute a :class:`~mpqemu_mgmt.orchestrate.plans.Plan` over a monitor channel, with rollback.

Each step runs under its own timeout; consecutive ``launch-remote`` steps run concurrently.
When a step fails, the undo steps of every step already done
run in reverse order (best effort, each under its own timeout), so a failed start or hot-plug
leaves no orphan remote, no named fd in QEMU and no half-plugged device; then the original error
is raised with ``details["rolled_back"]``. Proxy socket ends the runner holds are closed as soon
as QEMU has its copy (a remote only sees EOF, and exits, when no one else holds the proxy end) and
on every error path. Cancellation is never swallowed: the rollback runs, then it propagates.

The runner owns no policy: what to do comes from the plan; how to start or stop the main QEMU
comes from the driver (:class:`VmOps`). It updates the :class:`GuestRuntime` it is given
(remotes launched, stopped, placed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from mpqemu_mgmt.domain.spec import DeviceSpec
from mpqemu_mgmt.domain.topology import Placement
from mpqemu_mgmt.errors import MpqemuError, OrchestrationError, ProcessFailed, StepTimeout
from mpqemu_mgmt.orchestrate.channel import MonitorChannel, QmpCommandError
from mpqemu_mgmt.orchestrate.plans import Op, Plan, Step
from mpqemu_mgmt.orchestrate.processes import RemoteLauncher
from mpqemu_mgmt.orchestrate.qemu_argv import GuestPaths
from mpqemu_mgmt.orchestrate.runtime import GuestRuntime

log = logging.getLogger(__name__)
#: Called before each step runs (index, step); raising from it injects a failure (tests).
StepHook = Callable[[int, Step], None]


class VmOps(Protocol):
    """How the driver starts and stops the main QEMU."""

    async def launch_vm(self, step: Step, runtime: GuestRuntime) -> MonitorChannel: ...

    async def stop_vm(self, step: Step, runtime: GuestRuntime, channel: MonitorChannel | None) -> None: ...


@dataclass
class RunReport:
    plan: Plan
    #: seconds per step index, for benchmarks
    timings: list[float] = field(default_factory=list)
    undone: list[str] = field(default_factory=list)


class Runner:
    def __init__(self, runtime: GuestRuntime, vm: VmOps, launcher: RemoteLauncher,
                 channel: MonitorChannel | None, devices: Mapping[str, DeviceSpec], *,
                 before_step: StepHook | None = None) -> None:
        self.runtime = runtime
        self.vm = vm
        self.launcher = launcher
        self.channel = channel
        self._devices = devices
        self._held: dict[str, socket.socket] = {}
        #: vfio-user listeners waiting for QEMU's connection: device id → (socket, path, launch step)
        self._listeners: dict[str, tuple[socket.socket, str, Step]] = {}
        self._before = before_step
        self._paths = GuestPaths(runtime.state_dir)

    async def run(self, plan: Plan) -> RunReport:
        report = RunReport(plan)
        done: list[Step] = []
        steps = plan.steps
        try:
            index = 0
            while index < len(steps):
                # Consecutive remote launches are independent: run them together.
                end = index + 1
                if steps[index].op is Op.LAUNCH_REMOTE:
                    while end < len(steps) and steps[end].op is Op.LAUNCH_REMOTE:
                        end += 1
                batch = steps[index:end]
                if self._before is not None:
                    for offset, step in enumerate(batch):
                        self._before(index + offset, step)
                started = time.perf_counter()
                if len(batch) == 1:
                    try:
                        await self._step(batch[0])
                    except (StepTimeout, ProcessFailed):
                        if batch[0].undo_if_unsure:
                            done.append(batch[0])  # it may have happened: undo it too
                        raise
                    done.append(batch[0])
                else:
                    results = await asyncio.gather(*(self._step(s) for s in batch), return_exceptions=True)
                    done += [s for s, r in zip(batch, results, strict=True)
                             if not isinstance(r, BaseException)]
                    failed = [r for r in results if isinstance(r, BaseException)]
                    if failed:
                        raise failed[0]
                report.timings += [time.perf_counter() - started] * len(batch)
                index = end
        except BaseException as exc:
            await self._rollback(done, report)
            if isinstance(exc, MpqemuError):
                exc.details["rolled_back"] = list(report.undone)
                raise
            if isinstance(exc, Exception):
                raise OrchestrationError(f"{plan.action} of {plan.guest} failed: {exc!r}",
                                         rolled_back=list(report.undone)) from exc
            raise
        finally:
            self._close_held()
        return report

    async def _rollback(self, done: list[Step], report: RunReport) -> None:
        undo = [u for step in reversed(done) for u in step.undo]
        for step in undo:
            try:
                # Shielded: a cancelled start still cleans up after itself.
                await asyncio.shield(self._step(step))
                report.undone.append(_describe(step))
            except Exception as exc:  # best effort: keep undoing the rest
                log.warning("rollback step %s failed: %s", _describe(step), exc)
                report.undone.append(f"{_describe(step)} (failed: {exc})")
        self._close_held()

    def _close_held(self) -> None:
        for sock in self._held.values():
            sock.close()
        self._held.clear()
        for listener, path, _step in self._listeners.values():
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._listeners.clear()

    async def _step(self, step: Step) -> None:
        if step.op is Op.LAUNCH_VM:
            self.channel = await self.vm.launch_vm(step, self.runtime)
        elif step.op is Op.STOP_VM:
            await self.vm.stop_vm(step, self.runtime, self.channel)
        elif step.op is Op.LAUNCH_REMOTE:
            await self._launch_remote(step)
        elif step.op is Op.STOP_REMOTE:
            pending = self._listeners.pop(step.device or "", None)
            if pending is not None:
                pending[0].close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(pending[1])
            remote = self.runtime.remotes.pop(step.device or "", None)
            held = self._held.pop(f"proxy:{step.device}", None)
            if held is not None:
                held.close()
            if remote is not None:
                await self.launcher.stop(remote, timeout=step.timeout, force=step.force)
        elif step.op is Op.QMP:
            await self._qmp(step)
        else:  # pragma: no cover - Op is closed
            raise OrchestrationError(f"unknown step {step.op}")

    async def _launch_remote(self, step: Step) -> None:
        dev_id = step.device or ""
        listen = step.arguments.get("listen")
        if isinstance(listen, str):
            # vfio-user: only listen now; the remote starts on QEMU's connection (_plug_vfio_user).
            owner = _private_dir(os.path.dirname(listen), self.runtime.state_dir)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(listen)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                # 0600 from the start (unix_bind takes the inode's mode), then owned by the main
                # QEMU's uid, the only one that may connect; the 0700 directory keeps others out.
                os.fchmod(listener.fileno(), 0o600)
                listener.bind(listen)
                os.chown(listen, *owner)
                listener.listen(1)
                listener.setblocking(False)
            except BaseException:
                listener.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(listen)
                raise
            self._listeners[dev_id] = (listener, listen, step)
            return
        await self._spawn(step, dev_id, None)

    async def _spawn(self, step: Step, dev_id: str, connected: socket.socket | None) -> None:
        dev = self._devices[dev_id]
        spawned = await self.launcher.launch(
            dev_id, step.argv, qmp_path=self._paths.remote_qmp(dev_id),
            log_path=self._paths.remote_log(dev_id), backing=dev.backing, readonly=dev.readonly,
            timeout=step.timeout, device=dev, qemu_binary=self.runtime.spec.qemu_binary,
            connected=connected)
        self.runtime.remotes[dev_id] = spawned.runtime
        if spawned.proxy_end is not None:
            self._held[f"proxy:{dev_id}"] = spawned.proxy_end

    async def _plug_vfio_user(self, step: Step, channel: MonitorChannel) -> None:
        """device_add while accepting QEMU's connection and starting the remote on it."""
        dev_id = step.device or ""
        listener, path, launch_step = self._listeners.pop(dev_id)
        loop = asyncio.get_running_loop()

        async def accept_and_spawn() -> None:
            try:
                conn, _ = await loop.sock_accept(listener)
            finally:
                listener.close()
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # one client only: nobody else may connect
            conn.setblocking(True)
            await self._spawn(launch_step, dev_id, conn)

        task = asyncio.create_task(accept_and_spawn())
        try:
            await channel.execute(step.command or "", step.arguments, timeout=step.timeout)
            await asyncio.wait_for(asyncio.shield(task), launch_step.timeout)
        except BaseException:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise
        self._after_qmp(step)

    def _need_channel(self) -> MonitorChannel:
        if self.channel is None:
            raise OrchestrationError("no monitor channel to the main QEMU")
        return self.channel

    async def _qmp(self, step: Step) -> None:
        channel = self._need_channel()
        command = step.command or ""
        if command == "device_add" and step.device in self._listeners:
            await self._plug_vfio_user(step, channel)
            return
        if step.send_fd is not None:
            sock = self._held.get(step.send_fd)
            if sock is None:
                raise OrchestrationError(f"{command}: no held fd {step.send_fd}")
            try:
                await channel.send_fd(sock.fileno(), str(step.arguments["fdname"]), timeout=step.timeout)
            finally:
                # QEMU has its own copy now (or never will): ours must go so EOF reaches the remote.
                self._held.pop(step.send_fd, None)
                sock.close()
            return
        if step.wait is None:
            try:
                await channel.execute(command, step.arguments, timeout=step.timeout)
            except QmpCommandError as exc:
                if not _matches(exc.desc, step.done_if_error):
                    raise
            self._after_qmp(step)
            return
        for attempt in range(1, step.attempts + 1):
            waiter = channel.arm(step.wait)
            try:
                try:
                    await channel.execute(command, step.arguments, timeout=step.timeout)
                except QmpCommandError as exc:
                    if _matches(exc.desc, step.done_if_error):
                        return
                    if not _matches(exc.desc, step.wait_if_error):
                        raise
                try:
                    await waiter.wait(step.timeout)
                    return
                except StepTimeout:
                    log.info("%s: no %s after attempt %d/%d", command, step.wait.event, attempt,
                             step.attempts)
            finally:
                waiter.close()
        raise StepTimeout(
            f"{command} {dict(step.arguments)}: no {step.wait.event} after {step.attempts} attempts "
            f"of {step.timeout:g} s (the guest did not release the device)",
            command=command, device=step.device)

    def _after_qmp(self, step: Step) -> None:
        if step.command == "device_add" and step.device in self.runtime.remotes:
            bus = step.arguments.get("bus")
            addr = step.arguments.get("addr")
            if isinstance(bus, str) and isinstance(addr, str):
                self.runtime.remotes[step.device].placement = Placement(bus, int(addr, 16))


def _private_dir(path: str, state_dir: str) -> tuple[int, int]:
    """``path`` as a 0700 directory owned like the guest's state directory (the main QEMU's user,
    which must connect to the vfio-user sockets inside); that (uid, gid)."""
    st = os.stat(state_dir)
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chown(path, st.st_uid, st.st_gid)
    os.chmod(path, 0o700)
    return st.st_uid, st.st_gid


def _matches(desc: str, needles: tuple[str, ...]) -> bool:
    return any(n in desc for n in needles)


def _describe(step: Step) -> str:
    parts = [step.op.value]
    if step.command:
        parts.append(step.command)
    if step.device:
        parts.append(step.device)
    return " ".join(parts)


async def close_quietly(channel: MonitorChannel | None) -> None:
    if channel is not None:
        with contextlib.suppress(Exception):
            await channel.close()
