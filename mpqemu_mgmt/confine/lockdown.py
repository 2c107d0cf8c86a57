"""The remote's last step before serving: no new privileges, not dumpable, then the seccomp allowlist.

Called by a remote's ``__main__`` after every import, fd wrap and warm-up, because a tight
allowlist kills CPython's own start-up (confinement.md §5.2, §8.1 steps 6-9). Policies are
``policies/<arch>/<model>.policy`` (each includes ``common_device.policy``).

Two ways to get the filter:

* precompiled (the launcher's way): the parent compiled the policy with libseccomp
  (:func:`~mpqemu_mgmt.confine.seccomp_loader.bpf_memfd`) and handed the remote the raw BPF
  program on an fd (``--seccomp-bpf-fd``). :func:`read_bpf` takes it in before confinement and
  :func:`load_bpf` installs it with the seccomp(2) system call through plain ctypes, with the
  flags libseccomp's ``seccomp_load`` would use (src/system.c ``sys_filter_load``: TSYNC, plus LOG
  in errno mode). This keeps pyseccomp and ``ctypes.util`` (which pulls in subprocess, shutil,
  lzma, bz2, tempfile: about 1.5 MiB of resident memory) out of the remote;
* compiled by a forked child (a remote started by hand, without the fd): the child imports
  :mod:`~mpqemu_mgmt.confine.seccomp_loader` and the policy parser, compiles, hands the program
  back through a pipe and exits, so this process stays as small as a launched one.

Both end in the same :func:`load_bpf`.

Must not be called before imports are done, and must not start threads or open anything after
the filter is loaded (the filter forbids it). Must not import pyseccomp, the policy parser or
the profile in the calling process (only the compiling child does, or a policy lookup by the
launcher): a remote needs none of them.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import sys
from typing import TYPE_CHECKING

from mpqemu_mgmt.errors import ConfinementError, PolicyError

if TYPE_CHECKING:
    from pathlib import Path

    from mpqemu_mgmt.confine.policy import Policy

# <linux/prctl.h>
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38
# <linux/seccomp.h>, <asm/unistd_64.h>
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_FILTER_FLAG_TSYNC = 1
SECCOMP_FILTER_FLAG_LOG = 2
_NR_SECCOMP = {"x86_64": 317}
BPF_MAXINSNS = 4096  # <linux/bpf_common.h>: the kernel refuses longer classic BPF programs
_INSN_SIZE = 8  # struct sock_filter: u16 code, u8 jt, u8 jf, u32 k

#: seccomp(2) flags per mode, as seccomp_load sets them for the attributes build_filter sets
#: (CTL_TSYNC always; CTL_LOG in errno mode)
FILTER_FLAGS = {
    "enforce": SECCOMP_FILTER_FLAG_TSYNC,
    "log": SECCOMP_FILTER_FLAG_TSYNC,
    "errno": SECCOMP_FILTER_FLAG_TSYNC | SECCOMP_FILTER_FLAG_LOG,
}
MODES = (*FILTER_FLAGS, "off")

_MODEL = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_ARCH = {"x86_64": "x86_64", "amd64": "x86_64"}


class _SockFprog(ctypes.Structure):
    # struct sock_fprog (<linux/filter.h>): unsigned short len; struct sock_filter *filter
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _machine() -> str:
    return os.uname().machine  # what platform.machine() returns, without importing platform


def policy_path(model: str, policies: Path | None = None) -> Path:
    """``policies/<arch>/<model>.policy``; ConfinementError for an unknown model or architecture."""
    from mpqemu_mgmt.resources import data_dir

    if not _MODEL.match(model):
        raise ConfinementError(f"invalid device model name {model!r}")
    arch = _ARCH.get(_machine())
    if arch is None:
        raise ConfinementError(f"no seccomp policies for architecture {_machine()!r}")
    root = policies if policies is not None else data_dir("policies")
    path = root / arch / f"{model}.policy"
    if not path.is_file():
        raise ConfinementError(f"no seccomp policy for device model {model!r}", path=str(path))
    return path


def load_policy(model: str, policies: Path | None = None) -> Policy:
    """Read and parse the model's policy with its includes (IO: reads the policy files)."""
    from pathlib import Path

    from mpqemu_mgmt.confine.policy import parse_policy

    path = policy_path(model, policies)
    return parse_policy(str(path), lambda p: Path(p).read_text(encoding="utf-8"))


def read_bpf(fd: int) -> bytes:
    """Read (and close) the precompiled BPF program on ``fd``; ConfinementError if it is not one.

    Reads from offset 0 with pread, so a sealed memfd the parent wrote works whatever its offset.
    """
    try:
        chunks: list[bytes] = []
        offset = 0
        while True:
            chunk = os.pread(fd, 65536, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
            if offset > BPF_MAXINSNS * _INSN_SIZE:
                break
    except OSError as exc:
        raise ConfinementError(f"--seccomp-bpf-fd {fd} cannot be read: {exc}", fd=fd) from exc
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    program = b"".join(chunks)
    if not program or len(program) % _INSN_SIZE or len(program) > BPF_MAXINSNS * _INSN_SIZE:
        raise ConfinementError(
            f"--seccomp-bpf-fd {fd} does not hold a BPF program ({len(program)} bytes)", fd=fd
        )
    return program


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise ConfinementError(f"prctl({option}, {value}) failed", errno=err)


def load_bpf(program: bytes, mode: str) -> None:
    """Install a raw BPF program on the calling process with seccomp(2). Irreversible.

    Needs no_new_privs first (or CAP_SYS_ADMIN). With TSYNC the kernel returns the id of a thread
    it could not synchronise: that is a failure too, as libseccomp treats it.
    """
    flags = FILTER_FLAGS.get(mode)
    if flags is None:
        raise ConfinementError(f"seccomp mode {mode!r} has no filter")
    nr = _NR_SECCOMP.get(_machine())
    if nr is None:
        raise ConfinementError(f"no seccomp(2) number for architecture {_machine()!r}")
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // _INSN_SIZE, ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    rc = libc.syscall(
        ctypes.c_long(nr),
        ctypes.c_long(SECCOMP_SET_MODE_FILTER),
        ctypes.c_long(flags),
        ctypes.byref(prog),
    )
    if rc != 0:
        err = ctypes.get_errno() if rc < 0 else 0
        what = os.strerror(err) if err else f"thread {rc} could not be synchronised"
        raise ConfinementError(f"seccomp filter could not be loaded: {what}", errno=err)


def compile_in_child(model: str, mode: str) -> bytes:
    """The model's policy compiled to raw BPF by a forked child, which then exits.

    For a remote started by hand (no ``--seccomp-bpf-fd``): the child pays for pyseccomp,
    ``ctypes.util`` and the policy parser, this process never imports them, so it stays as small
    as one the launcher started. Before confinement only (fork is off the allowlist). Errors
    come back as the same classes (PolicyError for a broken policy, else ConfinementError).
    """
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; its result is checked by the parent's tests
        try:
            os.close(r)
            try:
                from mpqemu_mgmt.confine import seccomp_loader
                from mpqemu_mgmt.confine.profile import SeccompMode

                fd = seccomp_loader.bpf_memfd(load_policy(model), SeccompMode(mode))
                out = b"P" + read_bpf(fd)
            except OSError as exc:
                out = b"EConfinementError\0" + f"cannot read the seccomp policy for {model!r}: {exc}".encode()
            except Exception as exc:  # reported, never raised in a forked copy of the remote
                out = b"E" + type(exc).__name__.encode() + b"\0" + str(exc).encode()
            view = memoryview(out)
            while view:
                view = view[os.write(w, view) :]
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    try:
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    out = b"".join(chunks)
    if out[:1] == b"P" and len(out) > 1:
        return out[1:]
    kind, _, message = out[1:].partition(b"\0")
    text = message.decode(errors="replace") or "the compiling child died"
    if kind == b"PolicyError":
        raise PolicyError(text)
    raise ConfinementError(f"seccomp filter for {model!r} not compiled: {text}")


def lock_down(model: str, mode: str, bpf: bytes | None = None) -> None:
    """PR_SET_NO_NEW_PRIVS, PR_SET_DUMPABLE 0, then the model's seccomp filter in ``mode``.

    ``bpf``: the program precompiled by the parent (:func:`read_bpf`); without it, the policy is
    compiled by a forked child (:func:`compile_in_child`). Either way the raw program is loaded
    with :func:`load_bpf`. Raises ConfinementError (or PolicyError for a broken policy file)
    before anything irreversible when the policy cannot be read or compiled.
    """
    if mode not in MODES:
        from mpqemu_mgmt.confine.profile import SeccompMode

        SeccompMode.parse(mode)  # raises the UsageError that names the choices
    if mode != "off" and bpf is None:
        bpf = compile_in_child(model, mode)
    elif mode == "off" and bpf is not None:
        raise ConfinementError("a precompiled seccomp filter was given with --seccomp off")
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    # not dumpable: no core file of guest RAM and no ptrace by another process of the same uid
    _prctl(PR_SET_DUMPABLE, 0)
    if bpf is None:
        sys.stderr.write(
            "mpqemu-mgmt: WARNING: seccomp is OFF for this remote device process; "
            "a compromised device can make any system call (development only)\n")
        sys.stderr.flush()
        return
    load_bpf(bpf, mode)
