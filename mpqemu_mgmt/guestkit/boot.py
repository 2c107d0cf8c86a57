"""Boot the test guest once and collect its verdict (the IO shell around :mod:`.qemu_argv`).

:func:`boot` starts QEMU in its own process group with the caller's proxy sockets passed through
(``pass_fds``, same numbers), reads the serial console from stdout and QEMU's stderr until the guest
prints its marker and powers off, and returns the transcript, the script's exit status and timings.
A hard deadline bounds everything; QEMU's process group is killed on every path out. It must not
build kernels or images (see :mod:`.kernel`, :mod:`.initramfs`) or own the caller's sockets.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import selectors
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mpqemu_mgmt.errors import ProcessFailed
from mpqemu_mgmt.guestkit.initramfs import GuestScript, build_initramfs, store_initramfs
from mpqemu_mgmt.guestkit.kernel import Kernel
from mpqemu_mgmt.guestkit.qemu_argv import DEFAULT_QEMU, BootSpec, ProxyDevice, parse_status, qemu_argv

# After the marker the guest only has to run poweroff -f; QEMU normally exits within milliseconds.
_POWEROFF_GRACE = 5.0


@dataclass(frozen=True)
class BootResult:
    """What one boot produced. ``elapsed`` runs from spawning QEMU to the marker line."""

    status: int
    transcript: str
    stderr: str
    elapsed: float
    total: float
    returncode: int | None
    argv: tuple[str, ...]


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        # start_new_session made QEMU (or the bwrap in front of it) leader of its own group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def boot(spec: BootSpec, timeout: float = 60.0, serial_log: Path | None = None) -> BootResult:
    """Run one boot of ``spec``; raise :class:`ProcessFailed` if no marker came before ``timeout``.

    The error's details carry ``transcript``, ``stderr``, ``argv`` and ``returncode``. A script that
    failed is not an error: its status is in the result.
    """
    nonce = secrets.token_hex(8)
    argv = qemu_argv(spec, nonce)
    start = time.monotonic()
    deadline = start + timeout
    out = bytearray()
    err = bytearray()
    marker_at: float | None = None
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=spec.pass_fds,
            close_fds=True,
            start_new_session=True,
        )
    except OSError as exc:
        raise ProcessFailed(f"cannot start QEMU: {exc}", argv=argv) from exc
    try:
        assert proc.stdout is not None and proc.stderr is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ, out)
            sel.register(proc.stderr, selectors.EVENT_READ, err)
            while sel.get_map():
                now = time.monotonic()
                if now >= deadline:
                    break
                for key, _ in sel.select(deadline - now):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        continue
                    key.data.extend(chunk)
                    if marker_at is None and key.data is out and parse_status(_text(out), nonce) is not None:
                        marker_at = time.monotonic()
                        deadline = min(deadline, marker_at + _POWEROFF_GRACE)
        if proc.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, min(deadline, time.monotonic() + 1.0) - time.monotonic()))
    finally:
        _kill_group(proc)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    total = time.monotonic() - start
    transcript = _text(out)
    if serial_log is not None:
        serial_log.write_text(transcript)
    status = parse_status(transcript, nonce)
    if status is None or marker_at is None:
        tail = "\n".join(f"  | {line}" for line in (transcript + _text(err)).strip().splitlines()[-8:])
        raise ProcessFailed(
            "test guest did not finish its script"
            + (f" within {timeout:.0f} s" if total >= timeout else f" (QEMU exited {proc.returncode})")
            + (f"; last output:\n{tail}" if tail else "; no output"),
            transcript=transcript[-8000:],
            stderr=_text(err)[-4000:],
            argv=argv,
            returncode=proc.returncode,
        )
    return BootResult(
        status=status,
        transcript=transcript,
        stderr=_text(err),
        elapsed=marker_at - start,
        total=total,
        returncode=proc.returncode,
        argv=tuple(argv),
    )


def _text(buf: bytearray) -> str:
    return buf.decode(errors="replace").replace("\r\n", "\n")


def boot_script(
    kernel: Kernel,
    script: GuestScript,
    *,
    modules: Sequence[str] = (),
    proxies: Sequence[ProxyDevice] = (),
    devices: Sequence[str] = (),
    append: Sequence[str] = (),
    memory_mib: int = 256,
    accel: str = "tcg",
    machine: str = "pc",
    qmp_socket: Path | None = None,
    qemu_binary: str | None = None,
    qemu_argv_prefix: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    timeout: float = 60.0,
    serial_log: Path | None = None,
) -> BootResult:
    """Build (or reuse) the initramfs for ``script`` and boot it: the one-call form tests use."""
    initrd = store_initramfs(build_initramfs(kernel, script, modules))
    spec = BootSpec(
        kernel=kernel.vmlinuz,
        initrd=initrd,
        memory_mib=memory_mib,
        machine=machine,
        accel=accel,
        append=tuple(append),
        proxies=tuple(proxies),
        devices=tuple(devices),
        extra_args=tuple(extra_args),
        qmp_socket=qmp_socket,
        qemu_argv_prefix=tuple(qemu_argv_prefix),
        qemu_binary=qemu_binary or DEFAULT_QEMU,
    )
    return boot(spec, timeout=timeout, serial_log=serial_log)
