"""A real guest behind stock x-pci-proxy-dev devices whose remotes all run confined by the launcher.

Our pci-testdev and edu (``python -m mpqemu_mgmt.remote``, seccomp enforce, bwrap namespaces,
dedicated uid, rlimits) and a stock ``qemu-system-x86_64 -machine x-remote`` pci-testdev
(``-sandbox on,...``, same outer layers) serve one TCG guest. The guest must enumerate all three
and pass the edu script of the emulator issue (written against QEMU's own -device edu); the host
checks the confinement of each remote in /proc while the guest runs on them, and that none of them
was killed by its filter.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from mpqemu_mgmt.confine.launcher import LaunchedRemote, LaunchRequest, launch, profile_for
from mpqemu_mgmt.confine.profile import ConfinementProfile
from mpqemu_mgmt.guestkit.boot import BootResult, boot_script
from mpqemu_mgmt.guestkit.initramfs import GuestScript
from mpqemu_mgmt.guestkit.kernel import Kernel
from mpqemu_mgmt.guestkit.pcilist import by_ids, parse_pci_listing
from mpqemu_mgmt.guestkit.qemu_argv import ProxyDevice
from mpqemu_mgmt.guestkit.scripts import EDU_APPEND, EDU_ENV, script_text, verdicts

pytestmark = [
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 missing"),
    pytest.mark.skipif(os.geteuid() != 0, reason="confinement with a uid drop needs root"),
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
    pytest.mark.timeout(180),
]

WRAPPER = """
sh /guest/pci_list.sh
echo "--- edu_check"
sh /guest/edu_check.sh
"""


@dataclass
class Run:
    result: BootResult
    remotes: dict[str, LaunchedRemote]
    seen: dict[str, dict[str, str]]  # /proc/<pid>/status of each remote, read while serving


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, guest_kernel: Kernel) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("confined-guest")
    specs = {
        "t0": (LaunchRequest("t0", "pci-testdev", tmp / "t0.qmp", log_path=tmp / "t0.log"),
               ConfinementProfile()),
        "e0": (LaunchRequest("e0", "edu", tmp / "e0.qmp", log_path=tmp / "e0.log"), ConfinementProfile()),
        "s0": (LaunchRequest("s0", "pci-testdev", tmp / "s0.qmp", backend="qemu", log_path=tmp / "s0.log"),
               profile_for("qemu")),
    }
    script = GuestScript(WRAPPER, name="main.sh", env=EDU_ENV,
                         files={"pci_list.sh": script_text("pci_list.sh").encode(),
                                "edu_check.sh": script_text("edu_check.sh").encode()})
    with ExitStack() as stack:
        remotes: dict[str, LaunchedRemote] = {}
        for name, (req, profile) in specs.items():
            remote = launch(req, profile)
            stack.callback(remote.stop, 2.0)
            remotes[name] = remote
        for r in remotes.values():
            r.wait_ready(20)  # greets on QMP only after lock_down
        seen = {name: _status(r.pid) for name, r in remotes.items()}
        result = boot_script(
            guest_kernel, script,
            proxies=tuple(ProxyDevice(name, r.proxy.fileno()) for name, r in remotes.items()),
            append=EDU_APPEND, accel="tcg", timeout=120, serial_log=tmp / "serial.log")
        for name, r in remotes.items():  # still serving and still confined after the guest is done
            assert r.poll() is None, f"{name} ended with {r.poll()}: {r.log_path and r.log_path.read_text()}"
            assert _status(r.pid)["Seccomp"] == "2"
        yield Run(result, remotes, seen)


def test_guest_sees_all_three(run: Run) -> None:
    funcs = parse_pci_listing(run.result.transcript)
    assert len(by_ids(funcs, 0x1B36, 0x0005)) == 2  # ours and stock x-remote's pci-testdev
    [edu] = by_ids(funcs, 0x1234, 0x11E8)
    assert edu.bars[0].size == 1 << 20


def test_edu_script_passes_confined(run: Run) -> None:
    part = run.result.transcript.split("--- edu_check", 1)[-1]
    oks, fails = verdicts(part)
    assert not fails, "\n".join(fails)
    assert run.result.status == 0, run.result.transcript[-3000:]
    assert {"id", "liveness", "factorials", "irq_raise", "irq_ack", "dma_roundtrip", "dma_bounds",
            "dma_no_master"} <= oks


def test_every_remote_confined_while_serving(run: Run) -> None:
    host_ns = os.readlink("/proc/self/ns/net")
    for name, status in run.seen.items():
        remote = run.remotes[name]
        assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1", name
        assert "0" not in status["Uid"].split(), name
        assert status["CapEff"] == "0000000000000000", name
        assert os.readlink(f"/proc/{remote.pid}/ns/net") != host_ns
        expected = "qemu-sandbox" if name == "s0" else "enforce"
        assert remote.confinement.seccomp == expected
        assert remote.log_path is not None
        log = remote.log_path.read_text()
        assert "Traceback" not in log and "Bad system call" not in log, log
