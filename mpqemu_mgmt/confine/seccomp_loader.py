"""Compile a parsed :class:`~mpqemu_mgmt.confine.policy.Policy` into a libseccomp filter and load it.

The ONLY module that imports ``pyseccomp`` (ctypes over libseccomp.so.2). Modes map to the
filter's default action (confinement.md §8.3):

* ``enforce``: ``KILL_PROCESS`` with ``CTL_TSYNC`` so every thread is covered and one bad
  thread kills the whole process (crosvm uses TSYNC for the same reason, jail/src/helpers.rs);
* ``log``: ``LOG``: nothing is blocked, every off-list call is audited;
* ``errno``: ``ERRNO(EPERM)`` with ``CTL_LOG`` so denials are still audited;
* ``off``: no filter (the caller warns).

Must not parse policy text or decide what to allow: that is policy.py's and the policy files' job.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import IO, Any

import pyseccomp

from mpqemu_mgmt.confine.policy import Allow, Condition, Errno, Policy
from mpqemu_mgmt.confine.profile import SeccompMode
from mpqemu_mgmt.errors import ConfinementError, PolicyError

_OPS: dict[str, int] = {
    "==": pyseccomp.EQ,
    "!=": pyseccomp.NE,
    "<": pyseccomp.LT,
    "<=": pyseccomp.LE,
    ">": pyseccomp.GT,
    ">=": pyseccomp.GE,
    "&=": pyseccomp.MASKED_EQ,
}


def syscall_number(name: str) -> int:
    """The native syscall number for ``name``; PolicyError when libseccomp does not know it."""
    try:
        nr = int(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name))
    except (ValueError, OSError) as exc:
        raise PolicyError(f"unknown syscall {name!r}", file="<resolve>", line=0) from exc
    if nr < 0:
        # libseccomp returns negative pseudo-numbers for names that do not exist on this arch
        raise PolicyError(f"syscall {name!r} does not exist on this architecture", file="<resolve>", line=0)
    return nr


def syscall_name(nr: int) -> str:
    """The native name of syscall ``nr`` (for violation reports), or ``"syscall_<nr>"``."""
    try:
        raw = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, nr)
    except (ValueError, OSError):
        return f"syscall_{nr}"
    return raw.decode() if isinstance(raw, bytes) and raw else f"syscall_{nr}"


def _arg(c: Condition) -> Any:
    if c.op == "&=":
        return pyseccomp.Arg(c.arg, pyseccomp.MASKED_EQ, c.mask, c.value)
    return pyseccomp.Arg(c.arg, _OPS[c.op], c.value)


def _default_action(mode: SeccompMode) -> int:
    if mode is SeccompMode.ENFORCE:
        return int(pyseccomp.KILL_PROCESS)
    if mode is SeccompMode.LOG:
        return int(pyseccomp.LOG)
    if mode is SeccompMode.ERRNO:
        return int(pyseccomp.ERRNO(errno.EPERM))
    raise ConfinementError(f"seccomp mode {mode.value!r} has no filter")


def build_filter(policy: Policy, mode: SeccompMode) -> Any:
    """A ready-to-load ``pyseccomp.SyscallFilter`` (not loaded)."""
    default = _default_action(mode)
    try:
        flt = pyseccomp.SyscallFilter(default)
        flt.set_attr(pyseccomp.Attr.CTL_TSYNC, 1)
        flt.set_attr(pyseccomp.Attr.CTL_NNP, 1)
        if mode is SeccompMode.ERRNO:
            flt.set_attr(pyseccomp.Attr.CTL_LOG, 1)
    except OSError as exc:
        raise ConfinementError(f"libseccomp refused the filter attributes: {exc}") from exc
    for entry in policy.entries:
        nr = syscall_number(entry.syscall)
        action = entry.action
        try:
            if isinstance(action, Errno):
                act = int(pyseccomp.ERRNO(action.errno))
                if act != default:  # libseccomp refuses a rule equal to the default action
                    flt.add_rule(act, nr)
            elif isinstance(action, Allow):
                if not action.alternatives:
                    flt.add_rule(pyseccomp.ALLOW, nr)
                for conj in action.alternatives:
                    flt.add_rule(pyseccomp.ALLOW, nr, *(_arg(c) for c in conj))
                if action.otherwise is not None:
                    act = int(pyseccomp.ERRNO(action.otherwise))
                    if act != default:
                        flt.add_rule(act, nr, *(_arg(c) for c in action.negated))
        except OSError as exc:
            raise PolicyError(f"libseccomp refused the rule for {entry.syscall}: {exc}",
                              file=entry.source, line=entry.line) from exc
    return flt


def load(policy: Policy, mode: SeccompMode) -> None:
    """Install the filter on the calling process (all threads). Irreversible."""
    flt = build_filter(policy, mode)
    try:
        flt.load()
    except OSError as exc:
        raise ConfinementError(f"seccomp filter could not be loaded: {exc}") from exc


def export_bpf(policy: Policy, mode: SeccompMode, out: IO[bytes]) -> None:
    """Write the raw BPF program (for tests and for ``bwrap --seccomp FD``)."""
    out.flush()
    build_filter(policy, mode).export_bpf(out)


def bpf_memfd(policy: Policy, mode: SeccompMode) -> int:
    """The raw BPF program in a sealed, close-on-exec memfd, for a remote's ``--seccomp-bpf-fd``.

    The parent (the launcher) compiles, so the remote loads the program with plain seccomp(2)
    (:func:`~mpqemu_mgmt.confine.lockdown.load_bpf`) and never imports libseccomp's bindings.
    Sealed (no write, grow or shrink) so the program the remote reads is the one compiled here.
    The caller owns the returned fd.
    """
    flt = build_filter(policy, mode)
    fd = os.memfd_create("mpqemu-seccomp-bpf", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        with open(fd, "wb", closefd=False) as out:
            flt.export_bpf(out)
        fcntl.fcntl(
            fd,
            fcntl.F_ADD_SEALS,
            fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL,
        )
        os.lseek(fd, 0, os.SEEK_SET)
    except OSError as exc:
        os.close(fd)
        raise ConfinementError(f"cannot export the seccomp filter: {exc}") from exc
    except BaseException:
        os.close(fd)
        raise
    return fd


def export_pfc(policy: Policy, mode: SeccompMode, out: IO[str]) -> None:
    """Write the human-readable pseudo filter code."""
    out.flush()
    build_filter(policy, mode).export_pfc(out)
