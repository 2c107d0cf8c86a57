"""``python -m mpqemu_mgmt.remote``: one device model served on an inherited socket (Contracts 1).

    python -m mpqemu_mgmt.remote --device MODEL --fd N [--transport mpqemu|vfio-user]
        [--qmp-fd M | --qmp PATH] [--backing-fd K] [--readonly]
        [--seccomp enforce|log|errno|off] [--seccomp-bpf-fd K] [--log-level debug|info|warning|error]

Order (crosvm's fork-then-jail, architecture.md "Confinement ordering"): parse the arguments;
check and wrap every inherited fd (``--fd`` must be a connected AF_UNIX stream socket, ``--qmp-fd``
a *listening* one that the manager bound: this process never creates paths, except with the
development option ``--qmp PATH``); import and build everything the loop will use; then
``lock_down`` (no_new_privs, not dumpable, the model's seccomp allowlist); then serve.

The allowlist comes precompiled from the launcher on ``--seccomp-bpf-fd`` (a sealed memfd with the
raw BPF program, read and closed at start), so this process never imports libseccomp's bindings;
without that option (a remote started by hand) a forked child compiles the policy and exits,
with the same effect on this process's memory (confine/lockdown.py).

Exit status: 0 when the peer closes the socket (or QMP ``quit``), 1 on a protocol error, 2 for bad
arguments, 4 when confinement cannot be applied, 130 on SIGINT.

What it must not do: open files or sockets after ``lock_down`` (the filter forbids it), or start
threads.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import IO, NoReturn

from mpqemu_mgmt.errors import EXIT_INTERRUPTED, MpqemuError, UsageError
from mpqemu_mgmt.remote.polling import DEFAULT_MAX_WINDOW, MAX_POLL_US

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class _Log:
    """A minimal stderr logger (the logging package costs start-up time and memory)."""

    def __init__(self, level: str, model: str) -> None:
        self.level = _LEVELS[level]
        self.prefix = f"mpqemu-remote[{os.getpid()}] {model}: "

    def emit(self, level: int, message: str) -> None:
        if level >= self.level:
            try:
                sys.stderr.write(self.prefix + message + "\n")
                sys.stderr.flush()
            except (OSError, ValueError):
                pass

    def debug(self, message: str) -> None:
        self.emit(10, message)

    def warning(self, message: str) -> None:
        self.emit(30, message)

    def error(self, message: str) -> None:
        self.emit(40, message)


class _Formatter(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=100)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m mpqemu_mgmt.remote",
        description="mpqemu-mgmt remote device process",
        # a fixed width: HelpFormatter would otherwise import shutil (for the terminal size), and
        # with it lzma, bz2, zlib, fnmatch and locale, ~0.5 MiB of this process's resident memory
        formatter_class=_Formatter,
    )
    p.add_argument("--device", required=True, metavar="MODEL", help="pci-testdev, edu or virtio-blk")
    p.add_argument(
        "--fd", required=True, type=int, metavar="N", help="inherited connected AF_UNIX stream socket"
    )
    p.add_argument("--transport", choices=("mpqemu", "vfio-user"), default="mpqemu")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--qmp-fd", type=int, metavar="M", help="inherited listening AF_UNIX socket for QMP")
    q.add_argument("--qmp", metavar="PATH", help="bind a QMP socket at PATH (development)")
    p.add_argument("--backing-fd", type=int, metavar="K", help="inherited backing file (virtio-blk)")
    p.add_argument("--readonly", action="store_true", help="the backing file is read-only")
    p.add_argument("--seccomp", choices=("enforce", "log", "errno", "off"), default="enforce")
    p.add_argument(
        "--seccomp-bpf-fd", type=int, metavar="K",
        help="inherited fd with the seccomp filter precompiled by the launcher (raw BPF)",
    )  # fmt: skip
    p.add_argument(
        "--poll-us", type=_poll_us, default=DEFAULT_MAX_WINDOW * 1e6, metavar="US",
        help="longest adaptive busy-poll of the socket after a reply, in microseconds (0: off; "
        "QEMU's iothread poll-max-ns)",
    )  # fmt: skip
    p.add_argument("--log-level", choices=tuple(_LEVELS), default="warning")
    return p.parse_args(argv)


def _poll_us(text: str) -> float:
    value = float(text)
    if not 0 <= value <= MAX_POLL_US:
        raise argparse.ArgumentTypeError(f"{text!r} is not between 0 and {MAX_POLL_US} microseconds")
    return value


def _inherited_socket(fd: int, what: str, listening: bool) -> socket.socket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise UsageError(f"{what} {fd} is not an open socket: {exc}", fd=fd) from exc
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise UsageError(f"{what} {fd} is not an AF_UNIX SOCK_STREAM socket", fd=fd)
    if bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)) != listening:
        sock.detach()
        state = "listening" if listening else "connected"
        raise UsageError(f"{what} {fd} is not a {state} socket", fd=fd)
    return sock


def _backing(fd: int, readonly: bool) -> IO[bytes]:
    try:
        os.fstat(fd)
    except OSError as exc:
        raise UsageError(f"--backing-fd {fd} is not open: {exc}", fd=fd) from exc
    return os.fdopen(fd, "rb" if readonly else "r+b", buffering=0)


def _read_bpf(fd: int | None) -> bytes | None:
    """The precompiled filter from ``--seccomp-bpf-fd`` (read and closed now, before serving)."""
    if fd is None:
        return None
    from mpqemu_mgmt.confine.lockdown import read_bpf

    return read_bpf(fd)


def _confine(model: str, mode: str, bpf: bytes | None = None) -> None:
    try:
        from mpqemu_mgmt.confine.lockdown import lock_down
    except ImportError as exc:
        if mode == "off":
            return
        from mpqemu_mgmt.errors import ConfinementError

        raise ConfinementError(f"--seccomp {mode} requested but confinement is unavailable: {exc}") from exc
    lock_down(model=model, mode=mode, bpf=bpf)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = _Log(args.log_level, args.device)
    try:
        return _run(args, log)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except MpqemuError as exc:
        log.error(f"{type(exc).__name__}: {exc}")
        return exc.exit_code


def _run(args: argparse.Namespace, log: _Log) -> int:
    if args.transport == "vfio-user":
        # read and closed now, never left open; vfio_user_serve loads it after its own init
        args.seccomp_bpf = _read_bpf(args.seccomp_bpf_fd)
        return _run_vfio_user(args, log)

    from mpqemu_mgmt.devices import catalogue
    from mpqemu_mgmt.devices.base import DeviceHost
    from mpqemu_mgmt.remote.irq import EventfdIrq
    from mpqemu_mgmt.remote.memory import MappedGuestMemory
    from mpqemu_mgmt.remote.serve import Remote
    from mpqemu_mgmt.remote.timers import TimerQueue

    bpf = _read_bpf(args.seccomp_bpf_fd)
    sock = _inherited_socket(args.fd, "--fd", listening=False)
    listener = None
    if args.qmp_fd is not None:
        listener = _inherited_socket(args.qmp_fd, "--qmp-fd", listening=True)
    elif args.qmp is not None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(args.qmp)
        listener.listen(1)
    backing = _backing(args.backing_fd, args.readonly) if args.backing_fd is not None else None

    memory = MappedGuestMemory(log.warning)
    irq = EventfdIrq(log.warning)
    timers = TimerQueue(on_error=lambda exc: log.error(f"device model bug in a timer: {exc!r}"))
    host = DeviceHost(
        memory=memory,
        irq=irq,
        timers=timers,
        backing=backing,
        readonly=args.readonly,
        guest_error=log.warning,
    )
    model = catalogue.create(args.device, host)
    remote = Remote(
        sock, model, memory, irq, timers, log=log.debug if args.log_level == "debug" else log.warning,
        poll_window=args.poll_us * 1e-6,
    )
    if listener is not None:
        remote.attach_qmp(listener)
    _confine(args.device, args.seccomp, bpf)
    try:
        return remote.run()
    finally:
        remote.close()


def _run_vfio_user(args: argparse.Namespace, log: _Log) -> int:
    import importlib

    try:
        mod = importlib.import_module("mpqemu_mgmt.remote.vfio_user_serve")
    except ModuleNotFoundError as exc:
        raise UsageError("--transport vfio-user is not available in this build") from exc
    run = getattr(mod, "main_from_args", None)
    if run is None:
        raise UsageError("--transport vfio-user: mpqemu_mgmt.remote.vfio_user_serve has no main_from_args")
    return int(run(args, log))


def _exit(code: int) -> NoReturn:
    sys.stdout.flush()
    raise SystemExit(code)


if __name__ == "__main__":
    _exit(main())
