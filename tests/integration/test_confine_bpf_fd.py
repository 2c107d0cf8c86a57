"""The precompiled seccomp path: the parent compiles, the remote loads raw BPF with seccomp(2).

* :func:`lockdown.load_bpf` installs the program libseccomp compiled (``bpf_memfd``) with the same
  effect as libseccomp's own load: in errno mode an off-list call fails with EPERM, in enforce
  mode it kills the process with SIGSYS, on-list calls work (forked children);
* the remote emulator given ``--seccomp-bpf-fd`` is filtered (``Seccomp: 2``, ``NoNewPrivs: 1``),
  closed the fd, never mapped libseccomp (no pyseccomp/ctypes.util in the process), serves a
  config read and exits 0 when the proxy closes;
* a broken program is refused before serving (exit 4);
* without a program, lock_down has a forked child compile the policy (the same bytes as the
  parent would compile) and loads that; a child's failure comes back as the error it was.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpqemu_mgmt.confine import lockdown, seccomp_loader
from mpqemu_mgmt.confine.profile import SeccompMode
from mpqemu_mgmt.errors import ConfinementError
from mpqemu_mgmt.testing.logged_process import wait_or_kill
from mpqemu_mgmt.testing.proxysim import ProxySim

pytestmark = pytest.mark.timeout(60)


def _program(mode: SeccompMode, model: str = "pci-testdev") -> bytes:
    return lockdown.read_bpf(seccomp_loader.bpf_memfd(lockdown.load_policy(model), mode))


def _in_child(program: bytes | None, mode: str) -> tuple[int, bytes]:
    """Fork; the child loads ``program`` and tries an on-list write and an off-list pipe2."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            os.close(r)
            lockdown.lock_down("pci-testdev", mode, bpf=program)
            os.write(w, b"loaded;")
            try:
                os.pipe()
                os.write(w, b"pipe-ok")
            except PermissionError:
                os.write(w, b"pipe-eperm")
        except BaseException as exc:  # report, never return into pytest
            os.write(w, repr(exc).encode()[:200])
            code = 3
        os._exit(code)
    os.close(w)
    out = b""
    while chunk := os.read(r, 4096):
        out += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return status, out


def test_bpf_memfd_is_sealed_and_holds_whole_instructions() -> None:
    fd = seccomp_loader.bpf_memfd(lockdown.load_policy("edu"), SeccompMode.ENFORCE)
    try:
        with pytest.raises(PermissionError):
            os.write(fd, b"\0" * 8)  # F_SEAL_WRITE
    finally:
        program = lockdown.read_bpf(fd)  # closes fd
    assert len(program) % 8 == 0 and len(program) > 8
    with pytest.raises(OSError):
        os.fstat(fd)


def test_compiled_in_a_child_is_the_same_program() -> None:
    for mode in (SeccompMode.ENFORCE, SeccompMode.ERRNO):
        assert lockdown.compile_in_child("edu", mode.value) == _program(mode, "edu")


def test_compiling_in_a_child_reports_errors_as_errors() -> None:
    with pytest.raises(ConfinementError, match="no seccomp policy"):
        lockdown.compile_in_child("no-such-model", "enforce")


def test_lock_down_without_a_program_compiles_in_a_child_and_enforces() -> None:
    status, out = _in_child(None, "errno")
    assert out == b"loaded;pipe-eperm"
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_errno_mode_denies_off_list_calls_with_eperm() -> None:
    status, out = _in_child(_program(SeccompMode.ERRNO), "errno")
    assert out == b"loaded;pipe-eperm"
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_enforce_mode_kills_on_an_off_list_call() -> None:
    status, out = _in_child(_program(SeccompMode.ENFORCE), "enforce")
    assert out == b"loaded;"
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS


def test_log_mode_blocks_nothing() -> None:
    status, out = _in_child(_program(SeccompMode.LOG), "log")
    assert out == b"loaded;pipe-ok" and os.WIFEXITED(status)


@pytest.mark.parametrize("bad", [b"", b"\0" * 7, b"\0" * 8 * 4097])
def test_read_bpf_refuses_what_is_not_a_program(bad: bytes) -> None:
    fd = os.memfd_create("bad-bpf")
    os.write(fd, bad)
    with pytest.raises(ConfinementError, match="BPF program"):
        lockdown.read_bpf(fd)


def test_load_bpf_reports_the_kernel_refusal() -> None:
    # BPF_JMP|BPF_JA to nowhere: the kernel's checker refuses it (EINVAL); in a child, because
    # lock_down sets no_new_privs first
    status, out = _in_child(b"\x05\x00\x00\x00\xff\x00\x00\x00", "enforce")
    assert b"ConfinementError" in out and b"could not be loaded" in out
    assert os.WEXITSTATUS(status) == 3


@pytest.fixture
def remote_with_bpf(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], socket.socket]]:
    proxy, theirs = socket.socketpair()
    bpf = seccomp_loader.bpf_memfd(lockdown.load_policy("pci-testdev"), SeccompMode.ENFORCE)
    log = open(tmp_path / "remote.log", "wb")  # noqa: SIM115 - closed below
    argv = [sys.executable, "-m", "mpqemu_mgmt.remote", "--device", "pci-testdev",
            "--fd", str(theirs.fileno()), "--seccomp", "enforce", "--seccomp-bpf-fd", str(bpf)]
    try:
        proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(), bpf), stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL)
    finally:
        theirs.close()
        os.close(bpf)
        log.close()
    try:
        yield proc, proxy
    finally:
        proxy.close()
        wait_or_kill(proc, 5)


def test_remote_loads_the_precompiled_filter_without_libseccomp(
    remote_with_bpf: tuple[subprocess.Popen[bytes], socket.socket],
) -> None:
    proc, proxy = remote_with_bpf
    with ProxySim(proxy) as px:
        assert px.config_read(0, 4) == 0x00051B36  # answered: past lock_down
        lines = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
        status = {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}
        assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1"
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "libseccomp" not in maps
        fds = os.listdir(f"/proc/{proc.pid}/fd")
        assert len(fds) == 4  # stdin/out/err and the mpqemu socket: the BPF fd was closed
    proxy.close()
    assert proc.wait(10) == 0


def test_remote_refuses_a_broken_program_before_serving(tmp_path: Path) -> None:
    proxy, theirs = socket.socketpair()
    bad = os.memfd_create("bad-bpf")
    os.write(bad, b"\0" * 5)
    argv = [sys.executable, "-m", "mpqemu_mgmt.remote", "--device", "pci-testdev",
            "--fd", str(theirs.fileno()), "--seccomp", "enforce", "--seccomp-bpf-fd", str(bad)]
    try:
        res = subprocess.run(argv, pass_fds=(theirs.fileno(), bad), capture_output=True, timeout=30,
                             check=False)
    finally:
        theirs.close()
        os.close(bad)
        proxy.close()
    assert res.returncode == 4
    assert b"does not hold a BPF program" in res.stderr


def test_vfio_user_remote_takes_the_precompiled_filter_and_closes_its_fd() -> None:
    """The launcher passes --seccomp-bpf-fd for both transports; the vfio-user loop loads it too."""
    from mpqemu_mgmt.testing.vfio_user_client import VfioUserClient

    ours, theirs = socket.socketpair()
    bpf = seccomp_loader.bpf_memfd(lockdown.load_policy("edu"), SeccompMode.ENFORCE)
    argv = [sys.executable, "-m", "mpqemu_mgmt.remote", "--device", "edu", "--transport", "vfio-user",
            "--fd", str(theirs.fileno()), "--seccomp", "enforce", "--seccomp-bpf-fd", str(bpf)]
    proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(), bpf), stdin=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    theirs.close()
    os.close(bpf)
    try:
        ours.settimeout(20)
        client = VfioUserClient(ours)
        client.handshake()
        assert client.config_read(0, 4) == 0x11E81234  # answered: past lock_down
        lines = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
        status = {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}
        assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1"
        assert "libseccomp" not in Path(f"/proc/{proc.pid}/maps").read_text()
        assert len(os.listdir(f"/proc/{proc.pid}/fd")) == 4  # stdio + the vfio-user socket
        client.close()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
        ours.close()
