"""The command line of one remote device process, for either backend: pure.

* ``builtin``: ``python -I -m mpqemu_mgmt.remote --device MODEL --fd N --qmp-fd M
  [--backing-fd K] [--transport T] --seccomp MODE`` (DESIGN.md Contracts 1);
* ``qemu``: stock ``qemu-system-x86_64 -machine x-remote`` with one ``-device``, its
  ``x-remote-object`` on the inherited socket (docs/system/multi-process.rst), a QMP monitor on
  the inherited listening socket, disk images passed as fds through an fd set
  (``-add-fd`` + ``/dev/fdset/N``, so nothing is opened by path), and QEMU's own ``-sandbox``.

:func:`confined_command` is the whole command the launcher executes: ``prlimit ... --`` then
``bwrap ... --`` (namespaces.py) then the remote argv, with the seccomp BPF fd for ours. The
launcher calls it with the fd numbers it opened; ``mpqemu-mgmt plan`` calls it with named
placeholders (:meth:`RemoteFds.placeholders`, ``{fd:sock}``, ``{fd:qmp}``...) that map 1:1 onto
the numbers the launcher records (``LaunchedRemote.fds``), so the plan shows what really runs.
Host facts it depends on (tool paths, read-only binds) come in as :class:`LaunchHost`.

Also the one-device-per-process rule: :func:`check_one_device` refuses any argv that would put
a second device into one process. Must not spawn, open or look anything up.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from mpqemu_mgmt.confine import namespaces
from mpqemu_mgmt.confine.credentials import rlimit_argv
from mpqemu_mgmt.confine.profile import ConfinementProfile, Rlimits, SeccompMode
from mpqemu_mgmt.errors import OneDevicePerProcess, UsageError

_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
_MODEL = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_PROP = re.compile(r"^[A-Za-z0-9_.-]+=[^,]*$")


#: an inherited fd: its number (the launcher), or a named placeholder ``{fd:NAME}`` (a plan)
FdRef = int | str


def fd_placeholder(name: str) -> str:
    """``{fd:NAME}``: stands for the number the launcher records under NAME in ``fds``."""
    return "{fd:" + name + "}"


@dataclass(frozen=True, slots=True)
class RemoteFds:
    """The fds the remote inherits (the launcher numbers them, as QEMU's ``fd=4``)."""

    sock: FdRef
    qmp: FdRef
    backing: tuple[FdRef, ...] = ()
    #: qemu backend only: a read-only fd of each backing file, added to the same fd set
    #: (qemu_open_internal in util/osdep.c dups the member whose access mode matches, found by
    #: monitor_fdset_get_fd in 7.2's monitor/misc.c; the block layer opens read-only first)
    backing_ro: tuple[FdRef, ...] = ()
    #: builtin backend: the sealed memfd with the precompiled seccomp filter
    seccomp_bpf: FdRef | None = None
    #: the write end bwrap reports the sandbox's pids on (``--info-fd``), when namespaced
    info: FdRef | None = None

    def named(self) -> dict[str, FdRef]:
        """Every fd under its placeholder name (``sock``, ``qmp``, ``backing0``, ``backing0-ro``,
        ``seccomp-bpf``, ``info``)."""
        out: dict[str, FdRef] = {"sock": self.sock, "qmp": self.qmp}
        out |= {f"backing{i}": fd for i, fd in enumerate(self.backing)}
        out |= {f"backing{i}-ro": fd for i, fd in enumerate(self.backing_ro)}
        if self.seccomp_bpf is not None:
            out["seccomp-bpf"] = self.seccomp_bpf
        if self.info is not None:
            out["info"] = self.info
        return out

    @classmethod
    def placeholders(cls, *, backing: int = 0, backing_ro: bool = False, seccomp_bpf: bool = False,
                     info: bool = False) -> RemoteFds:
        """The placeholder form, the same shape as what the launcher opens."""
        return cls(
            sock=fd_placeholder("sock"), qmp=fd_placeholder("qmp"),
            backing=tuple(fd_placeholder(f"backing{i}") for i in range(backing)),
            backing_ro=tuple(fd_placeholder(f"backing{i}-ro") for i in range(backing)) if backing_ro else (),
            seccomp_bpf=fd_placeholder("seccomp-bpf") if seccomp_bpf else None,
            info=fd_placeholder("info") if info else None,
        )


def substitute_fds(argv: Sequence[str], fds: dict[str, int]) -> list[str]:
    """Replace every ``{fd:NAME}`` in ``argv`` by ``fds[NAME]`` (a plan's argv → what ran)."""
    out = []
    for arg in argv:
        for name, number in fds.items():
            arg = arg.replace(fd_placeholder(name), str(number))
        out.append(arg)
    return out


@dataclass(frozen=True, slots=True)
class LaunchHost:
    """The host facts a confined command line depends on, resolved by the launcher's IO shell."""

    prlimit: str
    bwrap: str
    #: read-only host paths visible inside the sandbox for this backend (code, venv, policies)
    ro_binds: tuple[str, ...] = ()
    #: the host root's merged-/usr links, e.g. ("usr/lib", "/lib")
    symlinks: tuple[tuple[str, str], ...] = ()


class RemoteRequest(Protocol):
    """What :func:`confined_command` reads of a launch request (confine.launcher.LaunchRequest)."""

    @property
    def device_id(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def backend(self) -> str: ...
    @property
    def transport(self) -> str: ...
    @property
    def backing(self) -> tuple[Path, ...]: ...
    @property
    def readonly(self) -> bool: ...
    @property
    def qemu_binary(self) -> str: ...
    @property
    def qemu_props(self) -> tuple[str, ...]: ...
    @property
    def poll_us(self) -> int | None: ...
    @property
    def qemu_extra(self) -> tuple[str, ...]: ...
    @property
    def module(self) -> str: ...
    @property
    def python(self) -> str: ...


def uses_seccomp_bpf(request: RemoteRequest, profile: ConfinementProfile) -> bool:
    """Does the launcher compile the allowlist and pass it as raw BPF (``--seccomp-bpf-fd``)?

    Our own remote only (stock QEMU brings ``-sandbox``), and only the real remote module (tests
    run probes with the same argv that know nothing of the option). Both transports: the filter
    is the model's policy from policies/, whatever protocol the device speaks.
    """
    return (request.backend == "builtin" and profile.seccomp is not SeccompMode.OFF
            and request.module == "mpqemu_mgmt.remote")


def remote_fds_shape(request: RemoteRequest, profile: ConfinementProfile) -> RemoteFds:
    """The placeholder fds for ``request``: exactly the set the launcher will open."""
    return RemoteFds.placeholders(backing=len(request.backing), backing_ro=request.backend == "qemu",
                                  seccomp_bpf=uses_seccomp_bpf(request, profile), info=profile.namespaces)


def effective_rlimits(profile: ConfinementProfile, backing_size: int) -> Rlimits:
    """The profile's limits, with RLIMIT_FSIZE raised to the largest backing file (it must stay
    writable up to its size)."""
    limits = profile.rlimits
    if backing_size > limits.fsize:
        limits = replace(limits, fsize=backing_size)
    return limits


def inner_argv(request: RemoteRequest, profile: ConfinementProfile, fds: RemoteFds) -> list[str]:
    """The remote's own command line (what bwrap executes inside the sandbox)."""
    if request.backend == "builtin":
        argv = builtin_argv(request.python, request.module, request.model, fds,
                            seccomp=profile.seccomp.value, transport=request.transport,
                            readonly=request.readonly, poll_us=request.poll_us)
        if fds.seccomp_bpf is not None:
            argv += ["--seccomp-bpf-fd", str(fds.seccomp_bpf)]
        return argv
    return qemu_argv(request.qemu_binary, request.device_id, request.model, fds,
                     props=request.qemu_props, sandbox=profile.qemu_sandbox,
                     extra=request.qemu_extra, readonly=request.readonly)


def confined_command(request: RemoteRequest, profile: ConfinementProfile, host: LaunchHost,
                     fds: RemoteFds, *, backing_size: int = 0) -> list[str]:
    """The exact argv the launcher executes: ``prlimit ... -- [bwrap ... --] <remote argv>``.

    ``fds`` are the launcher's numbers or :meth:`RemoteFds.placeholders`; ``backing_size`` is
    the largest backing file's size in bytes (for RLIMIT_FSIZE).
    """
    validate_id(request.device_id)
    argv = rlimit_argv(effective_rlimits(profile, backing_size), host.prlimit)
    inner = inner_argv(request, profile, fds)
    if not profile.namespaces:
        return argv + inner
    if fds.info is None:
        raise UsageError("a namespaced remote needs an --info-fd", device=request.device_id)
    sandbox = namespaces.Sandbox(ro_binds=host.ro_binds, symlinks=host.symlinks,
                                 die_with_parent=profile.die_with_parent)
    return argv + namespaces.bwrap_argv(host.bwrap, sandbox, inner, info_fd=fds.info)


def validate_id(device_id: str) -> None:
    # QEMU ids: letters first, then letters, digits, '-', '.', '_' (util/id.c id_wellformed)
    if not _ID.match(device_id):
        raise UsageError(f"invalid device id {device_id!r}")


def builtin_argv(
    python: str,
    module: str,
    model: str,
    fds: RemoteFds,
    *,
    seccomp: str,
    transport: str = "mpqemu",
    readonly: bool = False,
    poll_us: int | None = None,
) -> list[str]:
    if not _MODEL.match(model):
        raise UsageError(f"invalid device model {model!r}")
    if len(fds.backing) > 1:
        raise OneDevicePerProcess("a builtin remote takes at most one backing file", model=model)
    argv = [python, "-I", "-m", module, "--device", model, "--fd", str(fds.sock),
            "--qmp-fd", str(fds.qmp)]
    for fd in fds.backing:
        argv += ["--backing-fd", str(fd)]
    if readonly and fds.backing:
        argv.append("--readonly")
    if transport != "mpqemu":
        argv += ["--transport", transport]
    if poll_us is not None:
        argv += ["--poll-us", str(poll_us)]
    argv += ["--seccomp", seccomp]
    check_one_device(argv, "builtin")
    return argv


def qemu_argv(
    qemu: str,
    device_id: str,
    driver: str,
    fds: RemoteFds,
    *,
    props: Sequence[str] = (),
    sandbox: str,
    extra: Sequence[str] = (),
    readonly: bool = False,
) -> list[str]:
    validate_id(device_id)
    if not _MODEL.match(driver):
        raise UsageError(f"invalid QEMU device driver {driver!r}")
    for prop in props:
        # a ',' inside a value would smuggle more options into -device (QEMU's option syntax)
        if not _PROP.match(prop) or prop.split("=", 1)[0] in {"id", "driver"}:
            raise UsageError(f"invalid device property {prop!r}")
    # x-remote runs no guest code, but TCG still reserves its default 1 GiB translation buffer
    # (accel/tcg/translate-all.c), which RLIMIT_DATA would refuse: keep it small
    argv = [qemu, "-machine", "x-remote,vfio-user=off", "-accel", "tcg,tb-size=16", "-nodefaults",
            "-display", "none", "-serial", "none", "-monitor", "none"]
    device = [driver, f"id={device_id}", *props]
    if len(fds.backing_ro) != len(fds.backing):
        raise UsageError("every backing file needs a read-write (or, read-only, a second) fd")
    for index, (fd, ro_fd) in enumerate(zip(fds.backing, fds.backing_ro, strict=True)):
        fdset = index + 1
        drive = f"drive-{device_id}" if index == 0 else f"drive-{device_id}-{index}"
        members = [ro_fd] if readonly else [fd, ro_fd]
        for member in dict.fromkeys(members):
            argv += ["-add-fd", f"fd={member},set={fdset}"]
        argv += ["-drive", f"file=/dev/fdset/{fdset},if=none,id={drive},format=raw,file.locking=off"
                 + (",readonly=on" if readonly else "")]
        if index == 0:
            device.append(f"drive={drive}")
    argv += [
        "-device", ",".join(device),
        "-object", f"x-remote-object,id=robj-{device_id},devid={device_id},fd={fds.sock}",
        "-chardev", f"socket,id=mon,fd={fds.qmp},server=on,wait=off",
        "-mon", "chardev=mon,mode=control",
        "-sandbox", sandbox,
        *extra,
    ]
    check_one_device(argv, "qemu")
    return argv


def check_one_device(argv: Sequence[str], backend: str) -> None:
    """OneDevicePerProcess (exit 3) unless ``argv`` creates exactly one device and one link."""
    if backend == "builtin":
        devices = sum(1 for a in argv if a == "--device" or a.startswith("--device="))
        links = sum(1 for a in argv if a == "--fd" or a.startswith("--fd="))
    else:
        devices = sum(1 for a in argv if a in ("-device", "--device"))
        links = sum(1 for i, a in enumerate(argv)
                    if a in ("-object", "--object") and i + 1 < len(argv)
                    and argv[i + 1].startswith("x-remote-object"))
    if devices != 1 or links != 1:
        raise OneDevicePerProcess(
            f"one device per remote process: this command line has {devices} devices "
            f"and {links} links", devices=devices, links=links)
