"""Rule-table replay (confinement.md §8.4 #4, Firecracker test_seccomp_validate.py).

For the argument-constrained rules of the shipped policies, a child process loads the model's
compiled filter (enforce: KILL_PROCESS) and calls the syscall by number through ctypes: with the
allowed arguments it survives, with the argument tweaked it dies with SIGSYS; errno rules return
their errno instead of killing. No root needed: the filter is loaded under no_new_privs.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import pytest

from mpqemu_mgmt.confine.seccomp_loader import syscall_number

CHILD = textwrap.dedent("""
    import ctypes, json, os, signal, sys
    from mpqemu_mgmt.confine import seccomp_loader
    from mpqemu_mgmt.confine.lockdown import load_policy
    from mpqemu_mgmt.confine.profile import SeccompMode
    model, name, args = json.loads(sys.argv[1])
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                          ctypes.c_long]
    page = libc.mmap(None, 4096, 3, 0x22, -1, 0)   # PROT_READ|WRITE, MAP_PRIVATE|ANONYMOUS
    flag = ctypes.c_int(1)
    subst = {"PAGE": page, "PID": os.getpid(), "TID": ctypes.CDLL(None).gettid(),
             "FLAGPTR": ctypes.addressof(flag), "BUF": ctypes.addressof(ctypes.create_string_buffer(64))}
    argv = [ctypes.c_long(subst.get(a, a) if isinstance(a, str) else a) for a in args]
    signal.signal(signal.SIGABRT, signal.SIG_IGN)   # so the allowed tgkill(SIGABRT) is harmless
    nr = seccomp_loader.syscall_number(name)
    seccomp_loader.load(load_policy(model), SeccompMode.ENFORCE)
    rc = libc.syscall(nr, *argv)
    err = ctypes.get_errno() if rc == -1 else 0
    os.write(1, json.dumps([rc, err]).encode())
    os._exit(0)
""")

PROT_READ, PROT_EXEC = 0x1, 0x4
MAP_PRIVATE_ANON = 0x22
FIONBIO, TCGETS = 0x5421, 0x5401
ENOENT, ENOTTY, ENOSYS, EPERM = 2, 25, 38, 1

# (model, syscall, args, expected): "ok" survives, "kill" dies with SIGSYS, an int is an errno
CASES = [
    ("pci-testdev", "mmap", [0, 4096, PROT_READ, MAP_PRIVATE_ANON, -1, 0], "ok"),
    ("pci-testdev", "mmap", [0, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE_ANON, -1, 0], "kill"),
    ("pci-testdev", "mprotect", ["PAGE", 4096, PROT_READ], "ok"),
    ("pci-testdev", "mprotect", ["PAGE", 4096, PROT_READ | PROT_EXEC], "kill"),
    ("pci-testdev", "madvise", ["PAGE", 4096, 4], "ok"),  # MADV_DONTNEED
    ("pci-testdev", "madvise", ["PAGE", 4096, 100], "kill"),  # MADV_HWPOISON
    ("pci-testdev", "tgkill", ["PID", "TID", signal.SIGABRT], "ok"),
    ("pci-testdev", "tgkill", ["PID", "TID", signal.SIGTERM], "kill"),
    ("pci-testdev", "ioctl", [0, FIONBIO, "FLAGPTR"], "ok"),
    ("pci-testdev", "ioctl", [0, TCGETS, "BUF"], ENOTTY),
    ("pci-testdev", "openat", [-100, "BUF", 0], ENOENT),
    ("pci-testdev", "clone3", ["BUF", 88], ENOSYS),
    ("pci-testdev", "clone", [0x11, 0, 0, 0, 0], "kill"),  # fork-like: no CLONE_THREAD
    ("pci-testdev", "getpriority", [0, 0], "kill"),  # not listed at all
    ("pci-testdev", "preadv2", [0, 0, 0, 0, 0], "kill"),  # only virtio-blk reads a backing file
    ("virtio-blk", "preadv2", [0, "BUF", 0, 0, 0], "ok"),
    ("virtio-blk", "ftruncate", [0, 0], EPERM),
    ("edu", "socket", [2, 1, 0], "kill"),
]


@pytest.mark.parametrize(("model", "name", "args", "expected"), CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[3]}" for c in CASES])
def test_rule_replay(model: str, name: str, args: list[object], expected: object) -> None:
    syscall_number(name)  # the case names a real syscall
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps([model, name, args])],
                          capture_output=True, timeout=30, check=False)
    if expected == "kill":
        assert proc.returncode == -signal.SIGSYS, (proc.returncode, proc.stdout, proc.stderr)
        return
    assert proc.returncode == 0, (proc.returncode, proc.stderr.decode()[-2000:])
    rc, err = json.loads(proc.stdout)
    if expected == "ok":
        assert err not in (ENOSYS,) and not (rc == -1 and err == EPERM), (rc, err)
    else:
        assert (rc, err) == (-1, expected)
