"""The command line of one remote device process, for either backend: pure.

* ``builtin``: ``python -I -m mpqemu_mgmt.remote --device MODEL --fd N --qmp-fd M
  [--backing-fd K] [--transport T] --seccomp MODE`` (DESIGN.md Contracts 1);
* ``qemu``: stock ``qemu-system-x86_64 -machine x-remote`` with one ``-device``, its
  ``x-remote-object`` on the inherited socket (docs/system/multi-process.rst), a QMP monitor on
  the inherited listening socket, disk images passed as fds through an fd set
  (``-add-fd`` + ``/dev/fdset/N``, so nothing is opened by path), and QEMU's own ``-sandbox``.

Also the one-device-per-process rule: :func:`check_one_device` refuses any argv that would put
a second device into one process. Must not spawn, open or look anything up.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from mpqemu_mgmt.errors import OneDevicePerProcess, UsageError

_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
_MODEL = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_PROP = re.compile(r"^[A-Za-z0-9_.-]+=[^,]*$")


@dataclass(frozen=True, slots=True)
class RemoteFds:
    """The fd numbers the remote inherits (the launcher numbers them, as QEMU's ``fd=4``)."""

    sock: int
    qmp: int
    backing: tuple[int, ...] = ()
    #: qemu backend only: a read-only fd of each backing file, added to the same fd set
    #: (qemu_open_internal in util/osdep.c dups the member whose access mode matches, found by
    #: monitor_fdset_get_fd in 7.2's monitor/misc.c; the block layer opens read-only first)
    backing_ro: tuple[int, ...] = ()


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
