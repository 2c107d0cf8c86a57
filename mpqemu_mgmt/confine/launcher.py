"""Launch one remote device process, confined: the IO shell of ``mpqemu_mgmt.confine``.

Order (confinement.md §8.1): the launcher makes the mpqemu socketpair (or takes the connection the
caller hands over: vfio-user's QEMU connects to a path, so the orchestrator accepts and passes the
connected socket in ``LaunchRequest.connected``), binds the remote's QMP listening socket (0600, at
a path in the manager's state dir), opens the backing files and, for ours, compiles the model's
seccomp policy into a sealed BPF memfd, then spawns ``prlimit ... -- bwrap ... -- <remote argv>``
with exactly those fds (``pass_fds``), an empty environment, stdin from /dev/null and stdout/stderr
to the log, as the dedicated unprivileged uid/gid (``subprocess`` drops them in C before exec,
before bwrap makes the user namespace). Inside, the builtin remote calls
:func:`~mpqemu_mgmt.confine.lockdown.lock_down`; a stock QEMU remote gets ``-sandbox``. bwrap's
``--info-fd`` reports the host pid of its pid-1 reaper; the device process is that reaper's only
child, and its host pid gets a pidfd. (Not ``--as-pid-1``: a namespace's init ignores signals it
has no handler for, so ``abort()`` would end in SIGSEGV and SIGTERM would be ignored;
pid_namespaces(7).)

Every fd the launcher opened is closed, and every process it started is killed, on every
failure path. With ``die_with_parent`` (the default) the remote dies with the *thread* that
called :func:`launch` (PR_SET_PDEATHSIG semantics), so call it from a thread that lives as long
as the remote should (the event loop's default executor does).

The command line is :func:`remote_argv.confined_command` of the fds opened here and the host
facts of :func:`launch_host`; :func:`planned_command` is the same call with placeholder fds, for
``mpqemu-mgmt plan``. Must not decide policy (that is the profile) or build argv by hand
(remote_argv, namespaces, credentials do).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Literal

import mpqemu_mgmt
from mpqemu_mgmt.confine import (
    credentials,
    lockdown,
    namespaces,
    remote_argv,
    seccomp_loader,
    staging,
    violations,
)
from mpqemu_mgmt.confine.profile import (
    AppliedConfinement,
    ConfinementProfile,
    SeccompMode,
    parse_qemu_profile,
)
from mpqemu_mgmt.confine.seccomp_loader import syscall_name
from mpqemu_mgmt.errors import ConfinementError, MpqemuError, ProcessFailed, SeccompViolation
from mpqemu_mgmt.resources import data_dir

Backend = Literal["builtin", "qemu"]

#: exit status of a device killed by its seccomp filter, as bwrap reports it (128 + SIGSYS)
SECCOMP_KILL_STATUS = 128 + signal.SIGSYS


@dataclass(frozen=True, slots=True)
class LaunchRequest:
    """One remote device process to start."""

    device_id: str
    model: str  # builtin model (pci-testdev, edu, virtio-blk) or a QEMU device driver
    qmp_path: Path  # where the remote's QMP listening socket is bound (manager's state dir)
    backend: Backend = "builtin"
    transport: str = "mpqemu"
    backing: tuple[Path, ...] = ()  # backing files, opened here and passed as fds
    readonly: bool = False  # open the backing files read-only (and tell the remote so)
    qemu_binary: str = "qemu-system-x86_64"
    qemu_props: tuple[str, ...] = ()  # extra "key=value" properties of the QEMU -device
    poll_us: int | None = None  # builtin: the remote's --poll-us (None: its default)
    qemu_extra: tuple[str, ...] = ()  # extra QEMU arguments (checked: never a second device)
    #: the Python module run for the builtin backend (tests run a probe with the same argv)
    module: str = "mpqemu_mgmt.remote"
    python: str = field(default_factory=lambda: sys.executable)
    log_path: Path | None = None
    #: vfio-user: the connection QEMU made, served instead of a fresh socketpair. Owned by
    #: :func:`launch` (handed to the remote, then closed in the launcher on every path).
    connected: socket.socket | None = field(default=None, compare=False)


@dataclass(slots=True)
class LaunchedRemote:
    """A running confined remote. ``pid`` is the host pid of the device process itself."""

    device_id: str
    pid: int
    pidfd: int
    #: the proxy end of the socketpair (owned: give it to QEMU, close it); None when the remote
    #: serves a connection the caller handed over (``LaunchRequest.connected``)
    proxy: socket.socket | None
    qmp_path: Path
    argv: list[str]
    confinement: AppliedConfinement
    wrapper: subprocess.Popen[bytes]
    log_path: Path | None = None
    #: kmsg clock at launch: older audit records belong to an earlier owner of this pid
    started_usec: int = 0
    #: the fd numbers the remote inherited, by placeholder name (remote_argv.RemoteFds.named):
    #: ``planned_command`` with ``{fd:NAME}`` replaced by these is ``argv``
    fds: dict[str, int] = field(default_factory=dict)
    _closed: bool = False

    def poll(self) -> int | None:
        """The wrapper's exit status (128+N for a device killed by signal N), or None."""
        return self.wrapper.poll()

    def wait(self, timeout: float | None = None) -> violations.ExitReport:
        """Wait for the device to end; ProcessFailed on timeout."""
        try:
            rc = self.wrapper.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise ProcessFailed(f"remote {self.device_id} still running after {timeout}s",
                                device=self.device_id, pid=self.pid) from exc
        return violations.classify_exit(rc)

    def check_exit(self, timeout: float | None = None) -> violations.ExitReport:
        """Wait; raise SeccompViolation (naming the syscall when the audit log is readable)
        for a seccomp kill, ProcessFailed for any other non-zero end."""
        report = self.wait(timeout)
        if report.seccomp:
            raise seccomp_violation(self.device_id, self.pid, self.started_usec)
        if report.returncode != 0:
            raise ProcessFailed(f"remote {self.device_id} exited with status {report.returncode}",
                                device=self.device_id, pid=self.pid, returncode=report.returncode)
        return report

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Return once the remote's QMP monitor greets: it is past lock_down and serving.

        ProcessFailed when it ends first or stays silent for ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            if self.wrapper.poll() is not None:
                raise ProcessFailed(f"remote {self.device_id} ended during start-up "
                                    f"(status {self.wrapper.returncode})", device=self.device_id)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProcessFailed(f"remote {self.device_id} did not greet on QMP within {timeout}s",
                                    device=self.device_id, pid=self.pid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
                client.settimeout(remaining)
                try:
                    client.connect(str(self.qmp_path))
                    if b'"QMP"' in client.recv(4096):
                        return
                except OSError:
                    pass
            time.sleep(0.02)

    def stop(self, timeout: float = 2.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; close every fd; unlink the QMP socket."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.wrapper.poll() is not None:
                break
            self._signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.wrapper.wait(timeout)
        if self.wrapper.poll() is None:  # bwrap itself stuck: --die-with-parent covers the device
            self.wrapper.kill()
            self.wrapper.wait(timeout)
        self.close()
        rc = self.wrapper.returncode
        assert rc is not None
        return rc

    def _signal(self, sig: int) -> None:
        if self._closed:
            return
        with contextlib.suppress(ProcessLookupError, OSError):
            signal.pidfd_send_signal(self.pidfd, sig)

    def close(self) -> None:
        """Release the launcher's handles (not the process)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            os.close(self.pidfd)
        if self.proxy is not None:
            self.proxy.close()
        with contextlib.suppress(FileNotFoundError):
            self.qmp_path.unlink()

    def status(self) -> dict[str, object]:
        """The per-device part of ``status --format json`` this module knows (Contracts 4)."""
        return {"id": self.device_id, "pid": self.pid, "confinement": self.confinement.to_dict()}


def seccomp_violation(device_id: str, pid: int, since_usec: int | None = None) -> SeccompViolation:
    """The error for a seccomp kill of ``pid``, naming the syscall from the audit log if readable."""
    records = violations.read_kmsg(pid, since_usec)
    if records is None:
        return SeccompViolation(
            f"remote {device_id} (pid {pid}) was killed by its seccomp filter; "
            "the kernel log is not readable, so the syscall is unknown",
            device=device_id, pid=pid, syscall=None)
    kills = [r for r in records if r.action == violations.SECCOMP_RET_KILL_PROCESS] or records
    if not kills:
        return SeccompViolation(
            f"remote {device_id} (pid {pid}) was killed by its seccomp filter; "
            "no audit record found for it (the kernel rate-limits audit printk without auditd)",
            device=device_id, pid=pid, syscall=None)
    nr = kills[-1].syscall
    name = syscall_name(nr)
    return SeccompViolation(
        f"remote {device_id} (pid {pid}) was killed by its seccomp filter: "
        f"syscall {name} ({nr}) is not in its policy",
        device=device_id, pid=pid, syscall=name, syscall_nr=nr)


def _host_symlinks() -> tuple[tuple[str, str], ...]:
    """The merged-/usr links of the host root (/bin → usr/bin ...), reproduced in the sandbox."""
    links = []
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/") / name
        if path.is_symlink():
            links.append((os.readlink(path), str(path)))
    return tuple(links)


def _code_dirs(request: LaunchRequest) -> list[str]:
    """Where a builtin remote's code comes from: our package, the policies, the venv and the
    interpreter's directory; or only the staged copy it runs from (staging.py)."""
    if request.backend != "builtin":
        return []
    python = Path(request.python)
    if python.is_relative_to(staging.STAGE_ROOT):
        return [str(python.parent.parent)]  # the copy's venv: its python links into /usr
    package = Path(mpqemu_mgmt.__file__).resolve().parent
    paths = [str(package), str(data_dir("policies").resolve()), str(Path(sys.prefix).resolve())]
    paths.append(str(python.parent.resolve()) if not python.is_relative_to(sys.prefix) else "")
    return paths


def _with_reachable_code(request: LaunchRequest, ids: tuple[int, int] | None) -> LaunchRequest:
    """``request``, or the same run from the staged copy of the code when the remote's uid and
    gid (``ids``; None: no uid drop) cannot search a directory on the way to the code."""
    if ids is None:
        return request
    if all(credentials.unreachable_ancestor(p, *ids) is None for p in _code_dirs(request) if p):
        return request
    return replace(request, python=staging.staged_python())


def _planned_ids(profile: ConfinementProfile) -> tuple[int, int] | None:
    """The ids :func:`credentials.resolve` would give, without creating the user: an unknown user
    owns nothing, so (-1, -1) is judged by the 'other' permission bits, as its ids would be."""
    if os.geteuid() != 0:
        return None
    if profile.uid is not None and profile.gid is not None:
        return profile.uid, profile.gid
    try:
        entry = pwd.getpwnam(profile.user)
    except KeyError:
        return -1, -1
    return entry.pw_uid, entry.pw_gid


def _code_paths(request: LaunchRequest, profile: ConfinementProfile) -> tuple[str, ...]:
    """Read-only host paths the remote needs: its code (:func:`_code_dirs`), ld.so.cache."""
    paths = _code_dirs(request)
    if Path("/etc/ld.so.cache").exists():  # ctypes.util.find_library (pyseccomp) runs ldconfig -p
        paths.append("/etc/ld.so.cache")
    paths += list(profile.ro_binds)
    out: list[str] = []
    for p in paths:
        # /usr is already mounted; a path under it needs no second bind
        if p and p not in out and not (p == "/usr" or p.startswith("/usr/")):
            out.append(p)
    return tuple(out)


def _bind_qmp(path: Path) -> socket.socket:
    """A listening AF_UNIX socket at ``path``, mode 0600 (only the manager connects by path)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Linux creates the socket file with the socket inode's mode (net/unix/af_unix.c
        # unix_bind): fchmod before bind makes it 0600 from the start, without touching the
        # process-wide umask that other launcher threads share
        os.fchmod(listener.fileno(), 0o600)
        listener.bind(str(path))
        os.chmod(path, 0o600)
        listener.listen(4)
    except OSError as exc:
        listener.close()
        raise ConfinementError(f"cannot bind the QMP socket {path}: {exc}", path=str(path)) from exc
    return listener


def _read_child_pid(fd: int, wrapper: subprocess.Popen[bytes], timeout: float) -> int:
    """bwrap writes ``{"child-pid": N, ...}`` on --info-fd once the sandbox is set up."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ConfinementError(f"bwrap did not report the child pid within {timeout}s")
        ready, _, _ = select.select([fd], [], [], min(remaining, 0.2))
        if ready:
            chunk = os.read(fd, 4096)
            data += chunk
            if not chunk or data.rstrip().endswith(b"}"):
                break
        elif wrapper.poll() is not None and not data:
            break
    try:
        info = json.loads(data.decode() or "{}")
        return int(info["child-pid"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfinementError(
            f"bwrap failed before starting the remote (status {wrapper.poll()})") from exc


def _child_of(reaper: int, wrapper: subprocess.Popen[bytes], timeout: float) -> int:
    """The host pid of the one child of bwrap's reaper (the device), polling until it exists."""
    deadline = time.monotonic() + timeout
    children = Path(f"/proc/{reaper}/task/{reaper}/children")
    while True:
        try:
            pids = children.read_text().split()
        except OSError:
            pids = []
        if pids:
            return int(pids[0])
        if wrapper.poll() is not None:
            raise ConfinementError(f"the remote ended during start-up (status {wrapper.returncode})")
        if time.monotonic() > deadline:
            raise ConfinementError(f"the remote did not start within {timeout}s")
        time.sleep(0.002)


def _log_tail(path: Path | None, size: int = 2000) -> str:
    """The end of the remote's log (bwrap and the remote write their start-up errors there)."""
    if path is None:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def launch_host(request: LaunchRequest, profile: ConfinementProfile) -> remote_argv.LaunchHost:
    """The host facts the command line depends on: tool paths, read-only binds, /usr symlinks."""
    return remote_argv.LaunchHost(
        prlimit=shutil.which("prlimit") or "/usr/bin/prlimit",
        bwrap=shutil.which(profile.bwrap) or profile.bwrap,
        ro_binds=_code_paths(request, profile),
        symlinks=_host_symlinks(),
    )


def planned_command(request: LaunchRequest, profile: ConfinementProfile) -> list[str]:
    """The argv :func:`launch` would execute for ``request``, with ``{fd:NAME}`` placeholders where
    the launcher's fd numbers go (``LaunchedRemote.fds`` maps the names to the numbers it used).

    Reads the host (tool paths, binds) and the backing files' sizes; opens and starts nothing.
    """
    size = 0
    for path in request.backing:
        with contextlib.suppress(OSError):
            size = max(size, os.stat(path).st_size)
    request = _with_reachable_code(request, _planned_ids(profile))
    return remote_argv.confined_command(request, profile, launch_host(request, profile),
                                        remote_argv.remote_fds_shape(request, profile), backing_size=size)


def _check_connected(sock: socket.socket) -> None:
    """The hand-over must be what the remote's ``--fd`` accepts: a connected AF_UNIX stream."""
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ConfinementError("the connection handed to the launcher is not an AF_UNIX stream socket")
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ConfinementError("the socket handed to the launcher is listening, not connected")


def launch(request: LaunchRequest, profile: ConfinementProfile) -> LaunchedRemote:
    """Start one confined remote device process; see the module docstring for the order.

    ``request.connected`` (vfio-user: the connection QEMU made) is owned from here on: it is
    handed to the remote and closed in the launcher on every path, success or failure.
    """
    owned: list[int] = []  # fds to close in the launcher whatever happens
    proxy: socket.socket | None = None
    wrapper: subprocess.Popen[bytes] | None = None
    pidfd: int | None = None
    info_r = -1
    log: IO[bytes] | None = None
    try:
        if request.connected is not None:
            _check_connected(request.connected)
            owned.append(request.connected.detach())
        remote_argv.validate_id(request.device_id)
        started_usec = violations.monotonic_usec()
        creds = credentials.resolve(profile)
        request = _with_reachable_code(request, (creds.uid, creds.gid) if creds.drop else None)
        if Path(request.python).is_relative_to(staging.STAGE_ROOT):
            staging.ensure_staged()
        if request.connected is None:
            proxy, remote = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            owned.append(remote.detach())
        sock_fd = owned[0]
        listener = _bind_qmp(request.qmp_path)
        qmp_fd = listener.detach()
        owned.append(qmp_fd)
        backing: list[int] = []
        backing_ro: list[int] = []
        for path in request.backing:
            try:
                fd = os.open(path, (os.O_RDONLY if request.readonly else os.O_RDWR) | os.O_CLOEXEC)
                owned.append(fd)
                backing.append(fd)
                if request.backend == "qemu":
                    # QEMU's block layer opens read-only first, then read-write: the fd set needs
                    # a member of each access mode (7.2 monitor/misc.c monitor_fdset_get_fd
                    # matches O_ACCMODE)
                    ro = fd if request.readonly else os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                    if ro != fd:
                        owned.append(ro)
                    backing_ro.append(ro)
            except OSError as exc:
                raise ConfinementError(f"cannot open backing file {path}: {exc.strerror}",
                                       path=str(path)) from exc
        bpf: int | None = None
        if remote_argv.uses_seccomp_bpf(request, profile):
            # compile the allowlist here, so the remote loads raw BPF and never imports
            # pyseccomp/ctypes.util (about 2 MiB of its resident memory; lockdown.py)
            bpf = seccomp_loader.bpf_memfd(lockdown.load_policy(request.model), profile.seccomp)
            owned.append(bpf)
        info_w: int | None = None
        host = launch_host(request, profile)
        if profile.namespaces:
            info_r, info_w = os.pipe2(os.O_CLOEXEC)
            owned.append(info_w)
            if creds.drop:
                for bind in host.ro_binds:
                    blocked = credentials.unreachable_ancestor(bind, creds.uid, creds.gid)
                    if blocked is not None:
                        raise ConfinementError(
                            f"{bind} is not reachable by the remote's uid {creds.uid}: {blocked} is "
                            "not searchable by it (move the checkout, or configure another uid)",
                            path=bind, blocked=blocked)
        fds = remote_argv.RemoteFds(sock_fd, qmp_fd, tuple(backing), tuple(backing_ro),
                                    seccomp_bpf=bpf, info=info_w)
        seccomp_label = profile.seccomp.value if request.backend == "builtin" else "qemu-sandbox"
        size = max((os.fstat(fd).st_size for fd in backing), default=0)
        argv = remote_argv.confined_command(request, profile, host, fds, backing_size=size)
        if request.log_path is not None:
            request.log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(request.log_path, "ab")  # noqa: SIM115 - closed below, the child keeps its copy
        out: IO[bytes] | int = log if log is not None else subprocess.DEVNULL
        wrapper = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            pass_fds=tuple(owned), close_fds=True,
            env={"PATH": "/usr/bin:/usr/sbin:/bin:/sbin"} if not profile.namespaces else {"PATH": "/usr/bin"},
            cwd="/",
            user=creds.uid if creds.drop else None,
            group=creds.gid if creds.drop else None,
            extra_groups=[] if creds.drop else None,
            start_new_session=True,
        )
        for fd in owned:
            os.close(fd)
        owned.clear()
        if profile.namespaces:
            reaper = _read_child_pid(info_r, wrapper, profile.start_timeout)
            pid = _child_of(reaper, wrapper, profile.start_timeout)
        else:  # prlimit execs the remote in place: the wrapper pid is the device's
            pid = wrapper.pid
        pidfd = os.pidfd_open(pid)
        ns = namespaces.NAMESPACES if profile.namespaces else ()
        return LaunchedRemote(
            device_id=request.device_id, pid=pid, pidfd=pidfd, proxy=proxy,
            qmp_path=request.qmp_path, argv=argv,
            confinement=AppliedConfinement(seccomp_label, ns, creds.uid),
            wrapper=wrapper, log_path=request.log_path, started_usec=started_usec,
            fds={name: int(fd) for name, fd in fds.named().items()})
    except BaseException as exc:
        if request.connected is not None and request.connected.fileno() >= 0:
            request.connected.close()  # refused before the hand-over: still ours to close
        if wrapper is not None and wrapper.poll() is None:
            wrapper.kill()  # bwrap's --die-with-parent takes the device with it
            with contextlib.suppress(subprocess.TimeoutExpired):
                wrapper.wait(5)
        if pidfd is not None:
            os.close(pidfd)
        if proxy is not None:
            proxy.close()
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(request.qmp_path.lstat().st_mode):  # never another kind of file
                request.qmp_path.unlink()
        if isinstance(exc, MpqemuError):
            exc.details.setdefault("log", _log_tail(request.log_path))
        if isinstance(exc, MpqemuError | KeyboardInterrupt | SystemExit) or not isinstance(exc, Exception):
            raise
        raise ConfinementError(f"cannot launch remote {request.device_id}: {exc}",
                               device=request.device_id, log=_log_tail(request.log_path)) from exc
    finally:
        for fd in owned:
            with contextlib.suppress(OSError):
                os.close(fd)
        if info_r >= 0:
            os.close(info_r)
        if log is not None:
            log.close()


def profile_for(backend: Backend, base: ConfinementProfile | None = None) -> ConfinementProfile:
    """The profile for ``backend``: stock QEMU remotes get ``policies/qemu-remote.toml`` on top."""
    base = base or ConfinementProfile()
    if backend != "qemu":
        return base
    path = data_dir("policies") / "qemu-remote.toml"
    return parse_qemu_profile(path.read_text(encoding="utf-8"), base)


def unconfined_profile(mode: SeccompMode = SeccompMode.OFF) -> ConfinementProfile:
    """No namespaces (and seccomp ``mode``): for benchmarks comparing with the confined path."""
    return ConfinementProfile(seccomp=mode, namespaces=False)
