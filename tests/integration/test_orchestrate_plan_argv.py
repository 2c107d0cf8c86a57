"""The plan shows what runs: a plan's remote argv equals the argv the launcher executed, once the
``{fd:NAME}`` placeholders are replaced by the fd numbers the launch recorded.

Real launches (confined as root with bubblewrap: prlimit + bwrap + seccomp BPF fd; and the
unconfined ProcessLauncher), for our edu over mpqemu, our virtio-blk with a backing file, a stock
QEMU pci-testdev, and our edu over vfio-user started on a handed-over connection (which the
launcher closes after the hand-over, and also when it refuses it).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest

from mpqemu_mgmt.confine.launcher import LaunchRequest, launch, planned_command, profile_for
from mpqemu_mgmt.confine.profile import ConfinementProfile
from mpqemu_mgmt.confine.remote_argv import substitute_fds
from mpqemu_mgmt.domain.spec import DeviceSpec, parse_spec
from mpqemu_mgmt.errors import ConfinementError, UsageError
from mpqemu_mgmt.orchestrate.plans import Op, plan_for
from mpqemu_mgmt.orchestrate.processes import ProcessLauncher, RemoteLauncher
from mpqemu_mgmt.orchestrate.qemu_argv import GuestPaths, fill
from mpqemu_mgmt.testing.vfio_user_client import VfioUserClient
from tests.integration.orchestrate_helpers import short_root

pytestmark = pytest.mark.timeout(90)

CONFINED = os.geteuid() == 0 and shutil.which("bwrap") is not None


def _devices(image: Path) -> list[DeviceSpec]:
    devs = [DeviceSpec(id="e0", model="edu"),
            DeviceSpec(id="b0", model="virtio-blk", backing=str(image))]
    if shutil.which("qemu-system-x86_64"):
        devs.append(DeviceSpec(id="t0", model="pci-testdev", backend="qemu"))
    return devs


def _launchers() -> list[RemoteLauncher]:
    out: list[RemoteLauncher] = [ProcessLauncher(None)]
    if CONFINED:
        from mpqemu_mgmt.orchestrate.confined import ConfinedLauncher

        out.append(ConfinedLauncher())
    return out


@pytest.mark.parametrize("launcher", _launchers(), ids=lambda x: type(x).__name__)
def test_plan_argv_is_what_the_launcher_runs(launcher: RemoteLauncher) -> None:
    root = short_root("mpqa-")
    image = root / "disk.img"
    image.write_bytes(b"\0" * (1 << 20))
    devs = _devices(image)
    spec = parse_spec('name = "pa"\n', "pa.toml")
    for dev in devs:
        spec = spec.with_device(dev)
    paths = GuestPaths(str(root))
    plan = plan_for(spec, "start", state_dir=str(root), remote_command=launcher.command)
    planned = {s.device: s.argv for s in plan.steps if s.op is Op.LAUNCH_REMOTE}
    assert set(planned) == {d.id for d in devs}

    async def run() -> None:
        for dev in devs:
            spawned = await launcher.launch(
                dev.id, planned[dev.id], qmp_path=paths.remote_qmp(dev.id),
                log_path=paths.remote_log(dev.id), backing=dev.backing, readonly=dev.readonly,
                timeout=20, device=dev, qemu_binary=spec.qemu_binary)
            try:
                ran = list(spawned.runtime.argv)
                expected = fill(planned[dev.id], {"python": sys.executable})
                assert substitute_fds(expected, spawned.runtime.fds) == ran
                assert not any("{" in a and "}" in a and "fd:" in a for a in ran)
                if CONFINED and not isinstance(launcher, ProcessLauncher):
                    assert ran[0].endswith("prlimit") and any(a.endswith("bwrap") for a in ran)
                    assert {"sock", "qmp", "info"} <= set(spawned.runtime.fds)
                    if dev.backend == "builtin":
                        assert "seccomp-bpf" in spawned.runtime.fds
            finally:
                if spawned.proxy_end is not None:
                    spawned.proxy_end.close()
                await launcher.stop(spawned.runtime, timeout=5, force=False)

    try:
        asyncio.run(asyncio.wait_for(run(), 80))
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.skipif(not CONFINED, reason="the confined launcher needs root and bubblewrap")
def test_connected_socket_is_served_confined_and_closed(tmp_path: Path) -> None:
    """vfio-user hand-over: the remote serves the given connection inside the same sandbox; the
    launcher's copy is closed; the plan's argv (``--fd {fd:sock}``) matches what ran."""
    req_kw = {"transport": "vfio-user", "log_path": tmp_path / "v0.log"}
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    request = LaunchRequest("v0", "edu", tmp_path / "v0.qmp", connected=theirs, **req_kw)  # type: ignore[arg-type]
    profile = profile_for("builtin")
    plan_argv = planned_command(LaunchRequest("v0", "edu", tmp_path / "v0.qmp", **req_kw), profile)  # type: ignore[arg-type]
    launched = launch(request, profile)
    try:
        assert theirs.fileno() == -1  # handed over: the launcher kept no copy
        assert launched.proxy is None
        assert substitute_fds(plan_argv, launched.fds) == launched.argv
        launched.wait_ready(20)
        status = Path(f"/proc/{launched.pid}/status").read_text()
        assert "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status
        # exactly the fd set it was given, under the same numbers: stdio, the handed-over
        # connection and its QMP listener (the BPF memfd was read and closed, bwrap's info pipe
        # never reaches the device). wait_ready's QMP client may still be open on the remote's
        # side for a moment: poll until that one is gone.
        want = {0, 1, 2, launched.fds["sock"], launched.fds["qmp"]}
        deadline = time.monotonic() + 5
        while (held := {int(fd) for fd in os.listdir(f"/proc/{launched.pid}/fd")}) != want:
            assert time.monotonic() < deadline, (held, want)
            time.sleep(0.05)
        # it serves our end of the connection: a vfio-user handshake and edu's IDs come back
        client = VfioUserClient(ours)
        client.handshake()
        assert client.config_read(0, 4) == 0x11E81234  # edu: vendor 0x1234, device 0x11e8
    finally:
        ours.close()  # the client goes away: the vfio-user remote exits 0
        report = launched.wait(10)
        launched.close()
    assert report.returncode == 0


@pytest.mark.skipif(not CONFINED, reason="the confined launcher needs root and bubblewrap")
def test_refused_hand_over_is_closed(tmp_path: Path) -> None:
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(tmp_path / "l.sock"))
    listening.listen(1)
    with pytest.raises(ConfinementError, match="listening"):
        launch(LaunchRequest("v1", "edu", tmp_path / "v1.qmp", connected=listening), ConfinementProfile())
    assert listening.fileno() == -1
    ours, theirs = socket.socketpair()
    with pytest.raises(UsageError):  # an invalid id: refused before anything starts
        launch(LaunchRequest("1bad", "edu", tmp_path / "v2.qmp", connected=theirs), ConfinementProfile())
    assert theirs.fileno() == -1
    ours.settimeout(2)
    assert ours.recv(1) == b""  # no copy of the other end is left anywhere
    ours.close()
    assert not (tmp_path / "v1.qmp").exists() and not (tmp_path / "v2.qmp").exists()


@pytest.mark.skipif(not CONFINED, reason="the service's confined launcher needs root and bubblewrap")
def test_cli_plan_shows_what_the_service_runs() -> None:
    """``mpqemu-mgmt plan`` (no service needed) prints the argv the service's launcher executes."""
    import json
    import subprocess

    from mpqemu_mgmt.service.daemon import service_launcher

    root = short_root("mpqa-")
    spec = root / "g.toml"
    spec.write_text('name = "g"\n[[device]]\nid = "edu0"\nmodel = "edu"\n')
    state = root / "st"
    p = subprocess.run([sys.executable, "-m", "mpqemu_mgmt.cli.app", "--state-dir", str(state), "--format",
                        "json", "plan", str(spec), "start"], capture_output=True, text=True, timeout=60,
                       check=False)
    assert p.returncode == 0, p.stderr
    (step,) = [s for s in json.loads(p.stdout)["steps"] if s["op"] == "launch-remote"]
    argv = step["argv"]
    assert argv[0].endswith("prlimit") and "{fd:sock}" in argv and "--die-with-parent" not in argv
    launcher = service_launcher()
    assert launcher is not None
    paths = GuestPaths(str(state / "guests" / "g"))
    dev = DeviceSpec(id="edu0", model="edu")

    async def run() -> None:
        spawned = await launcher.launch("edu0", (), qmp_path=paths.remote_qmp("edu0"),
                                        log_path=str(root / "edu0.log"), backing=None, readonly=False,
                                        timeout=20, device=dev)
        try:
            assert substitute_fds(argv, spawned.runtime.fds) == list(spawned.runtime.argv)
        finally:
            if spawned.proxy_end is not None:
                spawned.proxy_end.close()
            await launcher.stop(spawned.runtime, timeout=5, force=False)

    try:
        asyncio.run(asyncio.wait_for(run(), 40))
    finally:
        shutil.rmtree(root, ignore_errors=True)
