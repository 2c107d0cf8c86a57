"""Proof that a remote launched by the real launcher is confined (confinement.md §8.4).

Real processes as root: the launcher starts ``mpqemu_mgmt.testing.confine_probe`` (the same argv
and the same lock_down() as the remote emulator) and the test drives it over the mpqemu socket,
then checks what the host sees in /proc and in the kernel's audit log.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mpqemu_mgmt.confine import violations
from mpqemu_mgmt.confine.launcher import LaunchedRemote, LaunchRequest, launch, profile_for
from mpqemu_mgmt.confine.profile import ConfinementProfile
from mpqemu_mgmt.errors import ConfinementError, OneDevicePerProcess, ProcessFailed, SeccompViolation

PROBE = "mpqemu_mgmt.testing.confine_probe"


def _bwrap_works() -> str | None:
    if os.geteuid() != 0:
        return "confinement proof tests need root (uid drop to a dedicated user)"
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed"
    r = subprocess.run(["bwrap", "--unshare-all", "--ro-bind", "/", "/", "true"],
                       capture_output=True, timeout=10, check=False)
    if r.returncode != 0:
        return f"bwrap cannot create namespaces here: {r.stderr.decode().strip()}"
    return None


_SKIP = _bwrap_works()
pytestmark = [pytest.mark.skipif(_SKIP is not None, reason=_SKIP or ""), pytest.mark.timeout(60)]
KMSG = violations.read_kmsg(-1) is not None


def audit_budget(needed: int) -> None:
    """Wait until the kernel can print ``needed`` more audit records.

    Without auditd, audit records reach kmsg through printk_ratelimit(): a burst of 10 per 5 s
    window, machine-wide (kernel.printk_ratelimit*). Records in the last 5 s tell how much of the
    current window is spent; wait for a fresh window when too little is left.
    """
    if not KMSG:
        return
    window = 5_200_000
    now = violations.monotonic_usec()
    recent = [r.usec for r in violations.read_kmsg() or [] if r.usec and r.usec > now - window]
    if len(recent) + needed > 9:
        time.sleep(max(0.0, (min(recent) + window - now) / 1e6))


class Probe:
    """A launched probe and a line-JSON client on the proxy end."""

    def __init__(self, remote: LaunchedRemote) -> None:
        self.remote = remote
        remote.proxy.settimeout(10)
        self.reader = remote.proxy.makefile("rb", buffering=0)

    def send(self, op: str, **kw: Any) -> None:
        self.remote.proxy.sendall(json.dumps({"op": op, **kw}).encode() + b"\n")

    def __call__(self, op: str, **kw: Any) -> dict[str, Any]:
        self.send(op, **kw)
        line = self.reader.readline()
        assert line, f"probe died on {op!r} (status {self.remote.wrapper.wait(5)})"
        reply: dict[str, Any] = json.loads(line)
        return reply

    def died_on(self, op: str, **kw: Any) -> violations.ExitReport:
        self.send(op, **kw)
        assert self.reader.readline() == b"", f"probe survived {op!r}"  # socket EOF
        return self.remote.wait(10)

    @property
    def log(self) -> str:
        assert self.remote.log_path is not None
        return self.remote.log_path.read_text(errors="replace")


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Any]:
    started: list[LaunchedRemote] = []

    def _start(mode: str = "enforce", model: str = "pci-testdev", **kw: Any) -> Probe:
        n = len(started)
        req = LaunchRequest(f"p{n}", model, tmp_path / f"p{n}.qmp", module=PROBE,
                            log_path=tmp_path / f"p{n}.log", **kw)
        remote = launch(req, ConfinementProfile().with_seccomp(mode))
        started.append(remote)
        probe = Probe(remote)
        assert probe("ping") == {"ok": True, "result": "pong"}  # past lock_down
        return probe

    yield _start
    for remote in started:
        remote.stop(0.5)
        with contextlib.suppress(ProcessLookupError):
            os.kill(remote.pid, 0)
            pytest.fail(f"device pid {remote.pid} survived stop()")


def device_python(remote: LaunchedRemote) -> str:
    """The interpreter the launcher ran the device with: the test's own, or the staged copy's
    when this checkout is not reachable by the remote's uid (confine/staging.py)."""
    return remote.argv[remote.argv.index("-I") - 1]


def _status(pid: int, task: int | None = None) -> dict[str, str]:
    path = f"/proc/{pid}/task/{task}/status" if task else f"/proc/{pid}/status"
    lines = Path(path).read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


# --- 1. a forbidden syscall kills, reported as a seccomp violation naming it -----------------
@pytest.mark.parametrize(("op", "kw", "syscall"), [
    ("socket_inet", {}, "socket"),
    ("fork", {}, "clone"),
    ("exec", {}, "execve"),
    ("kill", {"pid": 1}, "kill"),
    ("mmap_exec", {}, "mmap"),  # the argument predicate: PROT_EXEC is refused, plain mmap is not
])
def test_forbidden_syscall_kills(start: Any, op: str, kw: dict[str, Any], syscall: str) -> None:
    # Audit records share a machine-wide printk rate limit with every other test on the host:
    # when ours was dropped, run the scenario once more in a fresh window.
    for attempt in range(2):
        probe = start("enforce")
        audit_budget(10 if attempt else 1)
        report = probe.died_on(op, **kw)
        assert report.returncode == 159 and report.seccomp  # 128 + SIGSYS through bwrap
        with pytest.raises(SeccompViolation) as info:
            probe.remote.check_exit(1)
        if not KMSG:
            assert "not readable" in info.value.message
            return
        if info.value.details["syscall"] is not None:
            break
    assert info.value.details["syscall"] == syscall, info.value.message
    assert syscall in info.value.message
    records = violations.read_kmsg(probe.remote.pid, probe.remote.started_usec) or []
    assert any(r.action == violations.SECCOMP_RET_KILL_PROCESS for r in records)


def _records(probe: Probe, action: int, wanted: set[int]) -> set[int]:
    deadline = time.monotonic() + 1
    while True:
        records = violations.read_kmsg(probe.remote.pid, probe.remote.started_usec) or []
        seen = {r.syscall for r in records if r.action == action}
        if wanted <= seen or time.monotonic() > deadline:
            return seen
        time.sleep(0.05)


# --- 2. errno mode ----------------------------------------------------------------------------
def test_errno_mode(start: Any) -> None:
    for attempt in range(2):
        probe = start("errno")
        audit_budget(10 if attempt else 4)
        for op, kw in (("socket_inet", {}), ("fork", {}), ("kill", {"pid": 1}), ("mmap_exec", {})):
            assert probe(op, **kw) == {"ok": False, "errno": "EPERM"}, op
        assert probe("ping")["ok"]
        if not KMSG or {41, 56} <= _records(probe, violations.SECCOMP_RET_ERRNO, {41, 56}):
            return
    pytest.fail("errno-mode denials of socket and clone were not audited")


# --- 3. log mode ------------------------------------------------------------------------------
def test_log_mode(start: Any) -> None:
    for attempt in range(2):
        probe = start("log")
        audit_budget(10 if attempt else 3)
        assert probe("socket_inet") == {"ok": True, "result": "created"}
        assert probe("fork") == {"ok": True, "result": "forked"}  # inside its own pid namespace
        assert probe("ping")["ok"]
        if not KMSG:
            pytest.skip("the kernel log is not readable here: cannot check the LOG audit records")
        if {41, 56} <= _records(probe, violations.SECCOMP_RET_LOG, {41, 56}):  # socket, clone
            return
    pytest.fail("log-mode calls of socket and clone were not audited")


# --- 5, 12. the filter is installed; the host uid is not 0; namespaces differ ----------------
def test_proc_status_uid_and_namespaces(start: Any) -> None:
    probe = start("enforce")
    assert probe("thread")["result"] == 499500  # a thread works under the filter (7)
    pid = probe.remote.pid
    status = _status(pid)
    assert status["Seccomp"] == "2" and int(status["Seccomp_filters"]) >= 1
    assert status["NoNewPrivs"] == "1"
    uids = set(status["Uid"].split()) | set(status["Gid"].split())
    assert "0" not in uids and uids == {str(probe.remote.confinement.uid)} | set(status["Gid"].split())
    assert status["Groups"] == ""
    assert status["CapEff"] == "0000000000000000" and status["CapPrm"] == "0000000000000000"
    for task in os.listdir(f"/proc/{pid}/task"):  # every thread carries the filter (TSYNC)
        assert _status(pid, int(task))["Seccomp"] == "2"
    for ns in ("user", "pid", "net", "ipc", "uts", "mnt", "cgroup"):
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    assert probe.remote.confinement.to_dict()["seccomp"] == "enforce"
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:4] == [
        device_python(probe.remote).encode(), b"-I", b"-m", PROBE.encode()]  # the device itself, not bwrap
    ids = probe("ids")["result"]
    assert ids["pid"] == 2 and ids["uid"] == probe.remote.confinement.uid  # no reaper tricks


# --- 6. a crash is not a seccomp kill -------------------------------------------------------
def test_abort_is_sigabrt_not_sigsys(start: Any) -> None:
    report = start("enforce").died_on("abort")
    assert report.signal == signal.SIGABRT and not report.seccomp


def test_uncaught_exception_prints_a_traceback(start: Any) -> None:
    probe = start("enforce")
    report = probe.died_on("raise")
    assert report.returncode == 1 and not report.seccomp  # linecache's openat got ENOENT
    assert "RuntimeError: probe: deliberate uncaught exception" in probe.log


# --- 8. no network ----------------------------------------------------------------------------
def test_no_network(start: Any) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    abstract = socket.socket(socket.AF_UNIX)
    name = f"mpqemu-test-{os.getpid()}"
    abstract.bind("\0" + name)
    abstract.listen()
    try:
        probe = start("off")
        assert probe("ifnames")["result"] == ["lo"]
        port = listener.getsockname()[1]
        assert probe("connect_tcp", port=port) == {"ok": False, "errno": "ECONNREFUSED"}
        assert probe("connect_abstract", name=name) == {"ok": False, "errno": "ECONNREFUSED"}
    finally:
        listener.close()
        abstract.close()


# --- 9. no host pids --------------------------------------------------------------------------
def test_no_host_pids(start: Any) -> None:
    probe = start("off")
    pids = [p for p in probe("listdir", path="/proc")["result"] if p.isdigit()]
    assert sorted(pids) == ["1", "2"]  # bwrap's reaper and the device
    assert probe("kill", pid=os.getpid()) == {"ok": False, "errno": "ESRCH"}


# --- 10. no host files ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["off", "enforce"])
def test_no_host_files(start: Any, tmp_path: Path, mode: str) -> None:
    secret = tmp_path / "secret"
    secret.write_text("host secret")
    probe = start(mode)
    for path in (str(secret), "/etc/shadow", "/etc/hostname", "/root"):
        assert probe("open", path=path) == {"ok": False, "errno": "ENOENT"}, path
    root = probe("listdir", path="/")
    if mode == "off":  # only the minimal root is there, plus the first component of each code bind
        # wherever the checkout and venv live (CI: not /work), or the staged copy (staging.py)
        code = [Path(dst) for flag, _src, dst in zip(probe.remote.argv, probe.remote.argv[1:],
                                                       probe.remote.argv[2:], strict=False)
                if flag == "--ro-bind"]
        assert set(root["result"]) <= {"usr", "bin", "sbin", "lib", "lib64", "lib32", "libx32",
                                       "proc", "dev", "tmp", "etc"} | {p.parts[1] for p in code}
        assert "secret" not in " ".join(root["result"])
    else:  # seccomp: openat of a directory fails too
        assert root == {"ok": False, "errno": "ENOENT"}


# --- 11. the fd set is exactly the allowed one ---------------------------------------------
def test_exact_fd_set(start: Any, tmp_path: Path) -> None:
    leak = os.open(tmp_path / "not-for-the-remote", os.O_CREAT | os.O_RDWR)  # inheritable=False,
    os.set_inheritable(leak, True)  # ... and even an inheritable one must not get through
    try:
        probe = start("enforce")
    finally:
        os.close(leak)
    pid = probe.remote.pid
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    sock_fd, qmp_fd = int(argv[argv.index("--fd") + 1]), int(argv[argv.index("--qmp-fd") + 1])
    fds = {int(fd): os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    own = {fd for fd, target in fds.items() if target == "anon_inode:[eventpoll]"}  # its selector
    assert set(fds) - own == {0, 1, 2, sock_fd, qmp_fd}, fds
    assert fds[0] == "/dev/null" and fds[1] == fds[2] == str(probe.remote.log_path)
    assert fds[sock_fd].startswith("socket:") and fds[qmp_fd].startswith("socket:")
    assert len(own) <= 1


def test_backing_fd_is_passed_not_opened(start: Any, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * 65536)
    probe = start("enforce", model="virtio-blk", backing=(image,))
    pid = probe.remote.pid
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    backing = int(argv[argv.index("--backing-fd") + 1])
    assert os.readlink(f"/proc/{pid}/fd/{backing}") == str(image)
    assert probe("open", path=str(image)) == {"ok": False, "errno": "ENOENT"}


# --- 13. rlimits --------------------------------------------------------------------------
def test_rlimits(start: Any) -> None:
    probe = start("enforce")
    limits = {}
    for line in Path(f"/proc/{probe.remote.pid}/limits").read_text().splitlines()[1:]:
        name, soft, hard = line[:26].strip(), line[26:47].strip(), line[47:68].strip()
        limits[name] = (soft, hard)
    expected = ConfinementProfile().rlimits
    assert limits["Max open files"] == (str(expected.nofile),) * 2
    assert limits["Max core file size"] == ("0", "0")
    assert limits["Max file size"] == (str(expected.fsize),) * 2
    assert limits["Max data size"] == (str(expected.data),) * 2
    assert limits["Max processes"] == (str(expected.nproc),) * 2


# --- 14. lifecycle ------------------------------------------------------------------------
def test_dies_with_its_launcher(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from mpqemu_mgmt.confine.launcher import LaunchRequest, launch
        from mpqemu_mgmt.confine.profile import ConfinementProfile
        r = launch(LaunchRequest("l0", "pci-testdev", Path({str(tmp_path / "l0.qmp")!r}),
                                 module={PROBE!r}), ConfinementProfile())
        print(r.pid, flush=True)
        time.sleep(60)
    """)
    manager = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert manager.stdout is not None
        pid = int(manager.stdout.readline())
        pidfd = os.pidfd_open(pid)
    finally:
        manager.kill()
        manager.wait(10)
    try:
        # the launcher's proxy end closing would also end it; SIGKILL of bwrap's parent must too
        import select
        ready, _, _ = select.select([pidfd], [], [], 10)
        assert ready, f"device {pid} outlived its launcher"
    finally:
        os.close(pidfd)


def test_crash_is_reported_in_time(start: Any) -> None:
    probe = start("enforce")
    probe.send("socket_inet")
    t0 = time.monotonic()
    with pytest.raises(SeccompViolation):
        probe.remote.check_exit(5)
    assert time.monotonic() - t0 < 5


# --- 15. cgroups ----------------------------------------------------------------------------
def test_cgroup_limits() -> None:
    controllers = Path("/sys/fs/cgroup/cgroup.controllers")
    if not controllers.exists() or not {"memory", "pids"} <= set(controllers.read_text().split()):
        pytest.skip("no cgroup v2 hierarchy with memory and pids controllers to delegate here "
                    "(hybrid/v1 host): memory.max/pids.max placement cannot be tested")
    pytest.skip("cgroup v2 placement is not implemented yet; rlimits (NPROC, DATA) stand in")


# --- refusals and failure paths leave nothing behind ----------------------------------------
def _open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def test_second_device_refused_cleanly(tmp_path: Path) -> None:
    before = _open_fds()
    req = LaunchRequest("q0", "pci-testdev", tmp_path / "q0.qmp", backend="qemu",
                        qemu_extra=("-device", "edu,id=q1"))
    with pytest.raises(OneDevicePerProcess) as info:
        launch(req, profile_for("qemu"))
    assert info.value.exit_code == 3
    assert _open_fds() <= before and not (tmp_path / "q0.qmp").exists()


def test_failed_sandbox_cleans_up(tmp_path: Path) -> None:
    before = _open_fds()
    req = LaunchRequest("f0", "pci-testdev", tmp_path / "f0.qmp", module=PROBE)
    with pytest.raises(ConfinementError):
        launch(req, ConfinementProfile(bwrap="/nonexistent/bwrap", start_timeout=3))
    assert _open_fds() <= before and not (tmp_path / "f0.qmp").exists()


# --- the stock QEMU remote, same outer layers plus -sandbox ---------------------------------
def test_stock_qemu_remote_confined(tmp_path: Path) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    image = tmp_path / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))
    req = LaunchRequest("vb0", "virtio-blk-pci", tmp_path / "vb0.qmp", backend="qemu",
                        backing=(image,), log_path=tmp_path / "vb0.log")
    remote = launch(req, profile_for("qemu"))
    try:
        client = socket.socket(socket.AF_UNIX)
        client.settimeout(10)
        client.connect(str(req.qmp_path))
        reader = client.makefile("rb")
        assert b"QMP" in reader.readline()
        client.sendall(b'{"execute":"qmp_capabilities"}\n{"execute":"query-block"}\n')
        assert json.loads(reader.readline()) == {"return": {}}
        block = json.loads(reader.readline())["return"]
        assert block[0]["inserted"]["file"] == "/dev/fdset/1"  # passed as fds, never opened by path
        client.close()
        status = _status(remote.pid)
        assert status["Name"].startswith("qemu-system")
        assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1"
        assert "0" not in status["Uid"].split()
        assert os.readlink(f"/proc/{remote.pid}/ns/net") != os.readlink("/proc/self/ns/net")
        assert remote.confinement.seccomp == "qemu-sandbox"
        assert oct(os.stat(req.qmp_path).st_mode & 0o777) == "0o600"
    finally:
        remote.stop(2)
    assert not req.qmp_path.exists()


def test_readonly_backing_both_backends(start: Any, tmp_path: Path) -> None:
    image = tmp_path / "ro.img"
    image.write_bytes(b"\0" * (1 << 20))
    image.chmod(0o444)
    probe = start("enforce", model="virtio-blk", backing=(image,), readonly=True)
    pid = probe.remote.pid
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    assert "--readonly" in argv
    backing = int(argv[argv.index("--backing-fd") + 1])
    flags = Path(f"/proc/{pid}/fdinfo/{backing}").read_text().split("flags:")[1].split()[0]
    assert int(flags, 8) & os.O_ACCMODE == os.O_RDONLY
    if shutil.which("qemu-system-x86_64") is None:
        return
    req = LaunchRequest("ro0", "virtio-blk-pci", tmp_path / "ro0.qmp", backend="qemu",
                        backing=(image,), readonly=True, log_path=tmp_path / "ro0.log")
    remote = launch(req, profile_for("qemu"))
    try:
        remote.wait_ready(20)
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(10)
            client.connect(str(req.qmp_path))
            reader = client.makefile("rb")
            reader.readline()
            client.sendall(b'{"execute":"qmp_capabilities"}\n{"execute":"query-block"}\n')
            reader.readline()
            block = json.loads(reader.readline())["return"]
        assert block[0]["inserted"]["ro"] is True
        modes = {int(Path(f"/proc/{remote.pid}/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8)
                 & os.O_ACCMODE for fd in os.listdir(f"/proc/{remote.pid}/fd")
                 if os.readlink(f"/proc/{remote.pid}/fd/{fd}") == str(image)}
        assert modes == {os.O_RDONLY}  # no writable fd of the image anywhere in the process
    finally:
        remote.stop(2)


def test_never_unlinks_a_non_socket_at_the_qmp_path(tmp_path: Path) -> None:
    precious = tmp_path / "p0.qmp"
    precious.write_text("not a socket")
    req = LaunchRequest("p0", "pci-testdev", precious, module=PROBE)
    with pytest.raises(ConfinementError):
        launch(req, ConfinementProfile())
    assert precious.read_text() == "not a socket"


def test_start_up_failure_carries_the_log(tmp_path: Path) -> None:
    req = LaunchRequest("p0", "pci-testdev", tmp_path / "p0.qmp", module="mpqemu_mgmt.no_such_module",
                        log_path=tmp_path / "p0.log")
    remote = launch(req, ConfinementProfile())  # bwrap starts; the Python module then fails
    try:
        with pytest.raises(ProcessFailed) as info:
            remote.wait_ready(10)
        assert remote.wait(5).returncode == 1
        assert "No module named mpqemu_mgmt.no_such_module" in (tmp_path / "p0.log").read_text()
        assert info.value.exit_code == 4
    finally:
        remote.stop(0.5)
