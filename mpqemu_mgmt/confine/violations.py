"""Tell a seccomp kill from a crash, and name the syscall from the kernel's audit record.

bwrap reports a child killed by signal N as exit status 128+N, so a seccomp kill is 159
(128+SIGSYS); a direct child shows -31 (Firecracker tests use both). The kernel logs each
seccomp action as ``audit: type=1326 ... pid=P ... sig=31 arch=c000003e syscall=N ...
code=0x80000000`` (kernel/seccomp.c audit_seccomp; KILL_PROCESS is 0x80000000, LOG 0x7ffc0000,
ERRNO 0x00050000). Those lines are read from /dev/kmsg when it is readable; otherwise the report
says so (dmesg_restrict, no CAP_SYSLOG).

:func:`parse_audit` and :func:`classify_exit` are pure; :func:`read_kmsg` is the IO. This module
must not signal, kill or wait for processes: it only explains an exit that already happened.
"""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import dataclass

SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_KILL_THREAD = 0x00000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_LOG = 0x7FFC0000
SECCOMP_RET_ACTION_FULL = 0xFFFF0000

_PREFIX = re.compile(r"^\d+,\d+,(\d+),[^;]*;")  # kmsg "prio,seq,usec,flags;" (ABI dev-kmsg)
_AUDIT = re.compile(r"type=1326\b.*?\bpid=(\d+)\b.*?\bsyscall=(\d+)\b.*?\bcode=(0x[0-9a-fA-F]+)")
_COMM = re.compile(r'\bcomm="([^"]*)"')


@dataclass(frozen=True, slots=True)
class SeccompRecord:
    """One ``type=1326`` audit record."""

    pid: int
    syscall: int
    code: int
    comm: str
    #: printk timestamp, microseconds since boot (CLOCK_MONOTONIC's clock), or None
    usec: int | None = None

    @property
    def action(self) -> int:
        return self.code & SECCOMP_RET_ACTION_FULL


@dataclass(frozen=True, slots=True)
class ExitReport:
    """How a remote ended, from the wrapper's exit status."""

    returncode: int
    signal: int | None  # the signal that killed the device, if any
    seccomp: bool  # killed by its seccomp filter


def parse_audit(line: str) -> SeccompRecord | None:
    m = _AUDIT.search(line)
    if not m:
        return None
    comm = _COMM.search(line)
    prefix = _PREFIX.match(line)
    return SeccompRecord(int(m.group(1)), int(m.group(2)), int(m.group(3), 16),
                         comm.group(1) if comm else "", int(prefix.group(1)) if prefix else None)


def classify_exit(returncode: int) -> ExitReport:
    """``-N`` (direct child) or ``128+N`` (through bwrap) → the signal; SIGSYS → seccomp."""
    sig: int | None = None
    if returncode < 0:
        sig = -returncode
    elif 128 < returncode < 128 + 65:
        sig = returncode - 128
    return ExitReport(returncode, sig, sig == signal.SIGSYS)


def monotonic_usec() -> int:
    """Now, on the clock kmsg timestamps use (for :func:`read_kmsg`'s ``since_usec``)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def read_kmsg(pid: int | None = None, since_usec: int | None = None) -> list[SeccompRecord] | None:
    """Every seccomp audit record still in the kernel ring buffer (for ``pid`` if given).

    ``since_usec`` drops older records: pids wrap (pid_max), so a record of an earlier process
    with the same pid must not be blamed on this one. Without auditd the kernel prints audit
    records through printk_ratelimit() (10 per 5 s by default): a record can be missing.
    None when /dev/kmsg cannot be read (the caller says so rather than guessing).
    """
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    records: list[SeccompRecord] = []
    try:
        while True:
            try:
                chunk = os.read(fd, 8192)  # one record per read (Documentation/ABI/testing/dev-kmsg)
            except BlockingIOError:
                break
            except BrokenPipeError:  # EPIPE: records were overwritten while reading; keep going
                continue
            except OSError:
                return None
            if not chunk:
                break
            rec = parse_audit(chunk.decode("utf-8", "replace"))
            if rec is None or (pid is not None and rec.pid != pid):
                continue
            if since_usec is not None and rec.usec is not None and rec.usec < since_usec:
                continue
            records.append(rec)
    finally:
        os.close(fd)
    return records
