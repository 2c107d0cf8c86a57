"""Process plumbing for the drivers: pidfd waits, signals, and the fallback remote launcher.

:class:`RemoteLauncher` is what the runner needs to start and stop a remote device process.
:class:`ProcessLauncher` is the plain implementation: a ``socketpair``, the remote's end inherited
at exec (stock QEMU 7.2 crashed on a run-time ``object-add x-remote-object``, so the fd must be
there at exec), the optional backing file opened here and passed as an fd, stdout/stderr to the
device's log, an optional unprivileged uid, and a pidfd. ``confine/launcher.py`` (namespaces,
seccomp, rlimits) plugs in through the same protocol. Must not talk QMP or decide policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mpqemu_mgmt.domain.spec import DeviceSpec, GuestSpec
from mpqemu_mgmt.errors import MpqemuError, ProcessFailed, StepTimeout
from mpqemu_mgmt.orchestrate.qemu_argv import GuestPaths, fill, remote_argv
from mpqemu_mgmt.orchestrate.runtime import RemoteRuntime
from mpqemu_mgmt.procfs import pid_alive


@dataclass
class Spawned:
    runtime: RemoteRuntime
    #: Our end of the socketpair, for ``getfd``; the runner closes it once QEMU holds a copy.
    #: None when the remote was started on a connection QEMU made (vfio-user).
    proxy_end: socket.socket | None


class RemoteLauncher(Protocol):
    """``argv`` is the plan's command line; a launcher that builds its own (confined.py) uses
    ``device`` and ``qemu_binary`` instead. With ``connected`` (vfio-user: the connection QEMU
    made), the remote serves that socket and there is no proxy end; the launcher owns it.

    ``command`` is the argv :meth:`launch` will execute for a device, for the plan (fd numbers as
    placeholders the launch records in ``RemoteRuntime.fds``)."""

    def command(self, spec: GuestSpec, device: DeviceSpec, paths: GuestPaths) -> tuple[str, ...]: ...

    async def launch(self, device_id: str, argv: Sequence[str], *, qmp_path: str, log_path: str,
                     backing: str | None, readonly: bool, timeout: float,
                     device: DeviceSpec | None = None, qemu_binary: str = "qemu-system-x86_64",
                     connected: socket.socket | None = None) -> Spawned: ...

    async def stop(self, remote: RemoteRuntime, *, timeout: float, force: bool) -> None: ...


def open_pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def wait_exit(pid: int, pidfd: int | None, timeout: float) -> bool:
    """True once ``pid`` has exited (reaping it if it is our child), False after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        with contextlib.suppress(ChildProcessError, OSError):
            done, _status = os.waitpid(pid, os.WNOHANG)
            if done == pid:
                return True
        if not pid_alive(pid):
            return True
        left = deadline - loop.time()
        if left <= 0:
            return False
        if pidfd is not None:
            fut: asyncio.Future[None] = loop.create_future()
            loop.add_reader(pidfd, _resolve, fut)
            try:
                await asyncio.wait_for(fut, min(left, 0.5))
            except TimeoutError:
                pass
            finally:
                loop.remove_reader(pidfd)
        else:
            await asyncio.sleep(min(left, 0.02))


async def terminate(pid: int, pidfd: int | None, *, grace: float) -> None:
    """SIGTERM, wait ``grace``, then SIGKILL and wait; a process that is gone is fine."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not pid_alive(pid):
            await wait_exit(pid, pidfd, 0)
            return
        try:
            if pidfd is not None:
                signal.pidfd_send_signal(pidfd, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass
        if await wait_exit(pid, pidfd, wait):
            return
    raise ProcessFailed(f"process {pid} survived SIGKILL", pid=pid)


def close_pidfd(remote: RemoteRuntime) -> None:
    if remote.pidfd is not None:
        with contextlib.suppress(OSError):
            os.close(remote.pidfd)
        remote.pidfd = None


def resolve_user(name: str | None) -> tuple[int, int] | None:
    """(uid, gid) to run as, or None to stay as we are (not root, or no user given)."""
    if name is None or os.geteuid() != 0:
        return None
    entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def unreachable_for(path: str, uid: int, gid: int, *, need: int = os.R_OK) -> str | None:
    """Why ``uid``/``gid`` (no supplementary groups) cannot reach ``path``, or None if it can.

    Checks search permission on every parent and ``need`` (R_OK/W_OK/X_OK) on the path itself by the
    mode bits, as the kernel would for that user (no ACLs). Used before exec'ing QEMU as an
    unprivileged user, so "cannot open the kernel" becomes a clear refusal instead of a QEMU error.
    """
    def allowed(st: os.stat_result, bit: int) -> bool:
        if st.st_uid == uid:
            return bool(st.st_mode & (bit << 6))
        if st.st_gid == gid:
            return bool(st.st_mode & (bit << 3))
        return bool(st.st_mode & bit)

    target = Path(path).absolute()
    for parent in reversed(target.parents):
        try:
            st = os.stat(parent)
        except OSError as exc:
            return f"{parent}: {exc.strerror}"
        if not allowed(st, 1):
            return f"{parent} (mode {stat.filemode(st.st_mode)}, owner {st.st_uid}) is not searchable"
    try:
        st = os.stat(target)
    except OSError as exc:
        return f"{target}: {exc.strerror}"
    bit, what = {os.R_OK: (4, "readable"), os.W_OK: (2, "writable"), os.X_OK: (1, "searchable")}[need]
    if not allowed(st, bit):
        return f"{target} (mode {stat.filemode(st.st_mode)}, owner {st.st_uid}) is not {what}"
    return None


def prepare_dir(path: str, owner: tuple[int, int] | None, mode: int = 0o700) -> None:
    """The guest's state directory, writable by the unprivileged user our QEMUs run as.

    ``mode`` 0o711 lets libvirt's QEMU (another uid) reach the console file libvirt labels for it.
    """
    Path(path).mkdir(parents=True, exist_ok=True)
    if owner is not None:
        os.chown(path, owner[0], owner[1])
    os.chmod(path, mode)


def log_tail(path: str, lines: int = 5) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(text.strip().splitlines()[-lines:])


async def wait_for_socket(path: str, pid: int, log_path: str, timeout: float, what: str) -> None:
    """Until ``path`` is a socket; ProcessFailed if the process died, StepTimeout after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            if stat.S_ISSOCK(os.stat(path).st_mode):
                return
        except FileNotFoundError:
            pass
        if not pid_alive(pid):
            raise ProcessFailed(f"{what} (pid {pid}) exited during start: {log_tail(log_path)}",
                                pid=pid, log=log_path)
        if loop.time() >= deadline:
            raise StepTimeout(f"{what} (pid {pid}) did not open {path} within {timeout:g} s", pid=pid)
        await asyncio.sleep(0.005)


async def wait_serving(qmp_path: str, pid: int, log_path: str, timeout: float, what: str) -> None:
    """Until the process answers ``query-status`` on its QMP socket.

    A stock x-remote creates its QMP socket while parsing options, before ``-device`` fails, and a
    proxy realized against a dead remote still "succeeds" (hw/remote/proxy.c ignores failed config
    reads while probing). The main loop only serves QMP after machine init, when
    ``x-remote-object`` is connected, so an answer means the device is really being served.
    """
    from mpqemu_mgmt.orchestrate.channel import QmpChannel

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            chan = await QmpChannel.connect(qmp_path, timeout=0.2, name=f"probe-{pid}")
            try:
                await chan.execute("query-status", timeout=max(0.5, deadline - loop.time()))
                return
            finally:
                await chan.close()
        except MpqemuError as exc:
            if not pid_alive(pid):
                raise ProcessFailed(f"{what} (pid {pid}) exited during start: {log_tail(log_path)}",
                                    pid=pid, log=log_path) from exc
            if loop.time() >= deadline:
                raise StepTimeout(f"{what} (pid {pid}) does not answer QMP within {timeout:g} s",
                                  pid=pid) from exc


class ProcessLauncher:
    """socketpair + exec with the remote end inherited (no namespaces; see confine/launcher.py)."""

    def __init__(self, run_as: str | None = None) -> None:
        self._owner = resolve_user(run_as)

    def command(self, spec: GuestSpec, device: DeviceSpec, paths: GuestPaths) -> tuple[str, ...]:
        """The plan's argv, which :meth:`launch` fills in (``{python}``, ``{fd:sock}``, ...)."""
        return remote_argv(spec, device, paths)

    async def launch(self, device_id: str, argv: Sequence[str], *, qmp_path: str, log_path: str,
                     backing: str | None, readonly: bool, timeout: float,
                     device: DeviceSpec | None = None, qemu_binary: str = "qemu-system-x86_64",
                     connected: socket.socket | None = None) -> Spawned:
        proxy_end: socket.socket | None
        if connected is not None:
            proxy_end, remote_end = None, connected
        else:
            proxy_end, remote_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        keep = [remote_end.fileno()]
        backing_fd: int | None = None
        log = None
        proc: subprocess.Popen[bytes] | None = None
        try:
            if backing is not None:
                backing_fd = os.open(backing, os.O_RDONLY if readonly else os.O_RDWR)
                keep.append(backing_fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(qmp_path)
            fds = {"fd:sock": remote_end.fileno()}
            if backing_fd is not None:
                fds["fd:backing0"] = backing_fd
            full = fill(tuple(argv), {"python": sys.executable} | {k: str(v) for k, v in fds.items()})
            log = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
            kw: dict[str, object] = {}
            if self._owner is not None:
                kw = {"user": self._owner[0], "group": self._owner[1], "extra_groups": []}
            proc = subprocess.Popen(  # type: ignore[call-overload]
                full, pass_fds=keep, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, **kw)
        except BaseException:
            if proxy_end is not None:
                proxy_end.close()
            raise
        finally:
            remote_end.close()
            if backing_fd is not None:
                os.close(backing_fd)
            if log is not None:
                log.close()
        assert proc is not None
        remote = RemoteRuntime(
            device_id=device_id, pid=proc.pid, qmp_path=qmp_path, log_path=log_path, argv=tuple(full),
            fds={k.removeprefix("fd:"): v for k, v in fds.items()},
            confinement={"seccomp": _seccomp_of(full), "namespaces": [],
                         "uid": self._owner[0] if self._owner else os.geteuid()},
            pidfd=open_pidfd(proc.pid),
        )
        try:
            await wait_for_socket(qmp_path, proc.pid, log_path, timeout, f"remote {device_id}")
            await wait_serving(qmp_path, proc.pid, log_path, timeout, f"remote {device_id}")
        except BaseException:
            if proxy_end is not None:
                proxy_end.close()
            await terminate(proc.pid, remote.pidfd, grace=0.5)
            close_pidfd(remote)
            raise
        return Spawned(remote, proxy_end)

    async def stop(self, remote: RemoteRuntime, *, timeout: float, force: bool) -> None:
        try:
            if force or not await wait_exit(remote.pid, remote.pidfd, timeout):
                await terminate(remote.pid, remote.pidfd, grace=1.0)
        finally:
            close_pidfd(remote)
            with contextlib.suppress(OSError):
                os.unlink(remote.qmp_path)


def _seccomp_of(argv: Sequence[str]) -> str:
    if "--seccomp" in argv:
        return argv[list(argv).index("--seccomp") + 1]
    return "qemu-sandbox" if "-sandbox" in argv else "off"
