"""The confined remote launcher for the drivers: ``confine.launcher.launch`` behind the runner's
:class:`~mpqemu_mgmt.orchestrate.processes.RemoteLauncher` protocol.

``confine.launcher`` makes the socketpair (or takes the connection QEMU made to a vfio-user
device's path, handed over as ``connected``), binds the remote's QMP socket, opens backing files,
and starts the remote under its own uid, rlimits and bubblewrap namespaces (seccomp inside for
ours, ``-sandbox`` for stock QEMU); it builds the remote's argv itself. :meth:`command` renders
that same argv (``confine.launcher.planned_command``, fd numbers as ``{fd:NAME}`` placeholders),
and the plans show it. This adapter runs the blocking launch in a worker thread, waits until the
remote answers QMP, and stops remotes through the launcher's handle (which owns the bwrap wrapper)
or, for adopted remotes, through their pid. Must not build argv or decide confinement.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Sequence
from pathlib import Path

from mpqemu_mgmt.confine.launcher import LaunchedRemote, LaunchRequest, launch, planned_command, profile_for
from mpqemu_mgmt.confine.profile import ConfinementProfile
from mpqemu_mgmt.domain.spec import DeviceSpec, GuestSpec
from mpqemu_mgmt.errors import OrchestrationError
from mpqemu_mgmt.orchestrate.processes import Spawned, close_pidfd, terminate, wait_exit, wait_serving
from mpqemu_mgmt.orchestrate.qemu_argv import GuestPaths
from mpqemu_mgmt.orchestrate.runtime import RemoteRuntime


def launch_request(device: DeviceSpec, *, qmp_path: str, log_path: str, qemu_binary: str,
             connected: socket.socket | None = None) -> LaunchRequest:
    """What the launcher gets for one device of a guest spec."""
    return LaunchRequest(
        device_id=device.id, model=device.model, qmp_path=Path(qmp_path), backend=device.backend,
        transport=device.transport, backing=(Path(device.backing),) if device.backing else (),
        readonly=device.readonly, qemu_binary=qemu_binary, poll_us=device.poll_us,
        qemu_props=tuple(f"{k}={v}" for k, v in device.props), log_path=Path(log_path),
        connected=connected,
    )


class ConfinedLauncher:
    def __init__(self, base: ConfinementProfile | None = None) -> None:
        self._base = base
        self._handles: dict[int, LaunchedRemote] = {}

    async def launch(self, device_id: str, argv: Sequence[str], *, qmp_path: str, log_path: str,
                     backing: str | None, readonly: bool, timeout: float,
                     device: DeviceSpec | None = None, qemu_binary: str = "qemu-system-x86_64",
                     connected: socket.socket | None = None) -> Spawned:
        if device is None:
            if connected is not None:
                connected.close()
            raise OrchestrationError(f"confined launch of {device_id} needs its device spec",
                                     device=device_id)
        request = launch_request(device, qmp_path=qmp_path, log_path=log_path, qemu_binary=qemu_binary,
                           connected=connected)
        # from here on the launcher owns ``connected`` (closed after the hand-over on every path)
        handle = await asyncio.to_thread(launch, request, profile_for(device.backend, self._base))
        remote = RemoteRuntime(
            device_id=device_id, pid=handle.pid, qmp_path=qmp_path, log_path=log_path,
            argv=tuple(handle.argv), confinement=handle.confinement.to_dict(), fds=dict(handle.fds),
            # our own copy: the handle closes its pidfd when it stops the remote
            pidfd=os.dup(handle.pidfd),
        )
        try:
            await wait_serving(qmp_path, handle.pid, log_path, timeout, f"remote {device_id}")
        except BaseException:
            if handle.proxy is not None:
                handle.proxy.close()
            await asyncio.to_thread(handle.stop, 1.0)
            close_pidfd(remote)
            raise
        self._handles[handle.pid] = handle
        return Spawned(remote, handle.proxy)

    def command(self, spec: GuestSpec, device: DeviceSpec, paths: GuestPaths) -> tuple[str, ...]:
        """What :meth:`launch` will execute for ``device``: confine.launcher's own command line,
        with ``{fd:NAME}`` placeholders for the fd numbers (RemoteRuntime.fds after the launch)."""
        request = launch_request(device, qmp_path=paths.remote_qmp(device.id),
                           log_path=paths.remote_log(device.id), qemu_binary=spec.qemu_binary)
        return tuple(planned_command(request, profile_for(device.backend, self._base)))

    async def stop(self, remote: RemoteRuntime, *, timeout: float, force: bool) -> None:
        handle = self._handles.pop(remote.pid, None)
        try:
            exited = False if force else await wait_exit(remote.pid, remote.pidfd, timeout)
            if handle is not None:
                # Reaps the bwrap wrapper too (and SIGTERM/SIGKILLs the device if still running).
                await asyncio.to_thread(handle.stop, 0.5 if exited else 1.0)
            elif not exited:
                await terminate(remote.pid, remote.pidfd, grace=1.0)
        finally:
            close_pidfd(remote)
            with contextlib.suppress(OSError):
                os.unlink(remote.qmp_path)
