"""Lint of the shipped seccomp policies (minijail tools/seccomp_policy_lint.py, crosvm build.rs).

Every policy under policies/<arch>/ parses with its includes; every syscall name resolves on this
architecture; no name is listed twice; every entry is justified by a comment; the syscalls that
would hand a compromised device a new capability are absent or argument-restricted; the syscalls
CPython cannot live without are present; and each policy compiles to BPF in every mode.
"""

from __future__ import annotations

import platform
import tempfile
from pathlib import Path

import pytest

from mpqemu_mgmt.confine import seccomp_loader
from mpqemu_mgmt.confine.lockdown import load_policy
from mpqemu_mgmt.confine.policy import Allow, Errno, Policy, parse_policy
from mpqemu_mgmt.confine.profile import SeccompMode
from mpqemu_mgmt.resources import data_dir

ARCH_DIR = data_dir("policies") / "x86_64"
MODELS = ("pci-testdev", "edu", "virtio-blk")  # DESIGN.md Contracts 1
POLICY_FILES = sorted(ARCH_DIR.glob("*.policy"))

#: never allowed in a device process, not even with argument checks (Firecracker/crosvm/QEMU spawn=deny)
DENIED = {
    "socket", "socketpair", "connect", "bind", "listen", "execve", "execveat", "fork", "vfork",
    "ptrace", "process_vm_readv", "process_vm_writev", "kill", "tkill", "mount", "umount2",
    "pivot_root", "chroot", "setns", "unshare", "bpf", "perf_event_open", "userfaultfd",
    "keyctl", "add_key", "request_key", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
    "swapon", "swapoff", "setuid", "setgid", "setresuid", "setresgid", "setgroups", "capset",
    "open_by_handle_at", "name_to_handle_at", "memfd_secret", "seccomp", "pidfd_open",
    "pidfd_getfd", "pidfd_send_signal", "mknod", "mknodat", "symlink", "link", "unlink", "rename",
}
#: allowed only with an argument predicate or as an errno (minijail's DANGEROUS_SYSCALLS)
RESTRICTED = {"clone", "mmap", "mprotect", "madvise", "prctl", "ioctl", "tgkill", "openat", "open"}
#: CPython and the mpqemu link cannot run without these (ChromiumOS BASE_REQUIRED_SYSCALLS idea)
REQUIRED = {"exit_group", "exit", "rt_sigreturn", "rt_sigprocmask", "futex", "recvmsg", "sendmsg",
            "read", "write", "close", "mmap", "munmap", "brk", "clock_gettime", "tgkill", "getpid",
            "gettid", "openat"}


def _read(path: str) -> str:
    return Path(path).read_text(encoding="utf-8")


def test_x86_64_only_here() -> None:
    if platform.machine() != "x86_64":
        pytest.skip(f"the shipped policies are for x86_64; this machine is {platform.machine()}")


def test_every_model_has_a_policy() -> None:
    assert {p.stem for p in POLICY_FILES} >= {*MODELS, "common_device"}


@pytest.mark.parametrize("path", POLICY_FILES, ids=lambda p: p.name)
def test_policy_lints(path: Path) -> None:
    policy = parse_policy(str(path), _read)  # raises on syntax, duplicates, include cycles
    unjustified = [f"{e.source}:{e.line} {e.syscall}" for e in policy.entries if not e.justification]
    assert not unjustified, f"entries without a justifying comment: {unjustified}"
    for entry in policy.entries:
        seccomp_loader.syscall_number(entry.syscall)  # PolicyError when the name does not resolve
    names = policy.syscalls()
    assert not names & DENIED, f"{path.name} allows {sorted(names & DENIED)}"
    for entry in policy.entries:
        if entry.syscall in RESTRICTED:
            a = entry.action
            assert isinstance(a, Errno) or (isinstance(a, Allow) and a.alternatives), (
                f"{entry.source}:{entry.line} {entry.syscall} must carry an argument predicate")


def _model_policy(model: str) -> Policy:
    return load_policy(model)


@pytest.mark.parametrize("model", MODELS)
def test_model_policy_complete(model: str) -> None:
    policy = _model_policy(model)
    assert not REQUIRED - policy.syscalls(), f"{model} lacks {sorted(REQUIRED - policy.syscalls())}"
    assert Path(policy.entries[0].source).name == "common_device.policy"
    for mode in (SeccompMode.ENFORCE, SeccompMode.LOG, SeccompMode.ERRNO):
        with tempfile.TemporaryFile() as out:  # libseccomp writes to a real fd
            seccomp_loader.export_bpf(policy, mode, out)
            out.seek(0)
            program = out.read()
        # a BPF program is a whole number of 8-byte instructions, and not a trivial one
        assert len(program) % 8 == 0 and len(program) > 8 * 20


def test_w_xor_x_predicates() -> None:
    policy = _model_policy("pci-testdev")
    for name in ("mmap", "mprotect"):
        entry = policy.entry(name)
        assert entry is not None and isinstance(entry.action, Allow)
        [[cond]] = entry.action.alternatives
        assert (cond.arg, cond.op, cond.mask, cond.value) == (2, "&=", 0x4, 0)
