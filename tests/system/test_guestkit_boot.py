"""The boot runner against a real guest: exit status, module loading, the hard timeout."""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from pathlib import Path

import pytest

from mpqemu_mgmt.errors import ProcessFailed
from mpqemu_mgmt.guestkit.boot import boot_script
from mpqemu_mgmt.guestkit.initramfs import GuestScript
from mpqemu_mgmt.guestkit.kernel import Kernel

LSMOD_SCRIPT = """
echo "args: $(cat /proc/cmdline)"
echo "env: GREETING=$GREETING"
echo "extra: $(cat /guest/extra.txt)"
lsmod | while read -r name _rest; do echo "module: $name"; done
exit 7
"""


def _query_status(path: Path, seen: list[str]) -> None:
    """Ask QEMU's QMP socket for its run state while the guest boots (qapi/run-state.json)."""
    deadline = time.monotonic() + 20
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        stream = sock.makefile("rw")
        assert "QMP" in json.loads(stream.readline())
        for command in ("qmp_capabilities", "query-status"):
            stream.write(json.dumps({"execute": command}) + "\n")
            stream.flush()
            reply = json.loads(stream.readline())
            while "return" not in reply:  # skip events
                reply = json.loads(stream.readline())
        seen.append(reply["return"]["status"])


def test_status_modules_env_files_and_qmp(guest_kernel: Kernel, qemu72: str, tmp_path: Path) -> None:
    wanted = ["virtio_pci", "virtio_blk", "uio_pci_generic"]
    script = GuestScript(LSMOD_SCRIPT, env={"GREETING": "hello there"}, files={"extra.txt": b"shipped"})
    log = tmp_path / "serial.log"
    qmp = tmp_path / "qmp.sock"
    seen: list[str] = []
    asker = threading.Thread(target=_query_status, args=(qmp, seen), daemon=True)
    asker.start()
    result = boot_script(guest_kernel, script, modules=wanted, append=["iomem=relaxed"], timeout=60,
                         serial_log=log, qmp_socket=qmp)
    asker.join(10)
    assert seen == ["running"]
    assert result.status == 7
    loaded = set(re.findall(r"^module: (\S+)", result.transcript, re.M))
    # the wanted modules and their dependencies from .modinfo (no modules.dep in the package)
    assert set(guest_kernel.load_order(wanted)) <= loaded, result.transcript
    assert {"virtio_ring", "virtio", "uio", "virtio_pci_modern_dev"} <= loaded
    assert "insmod" not in result.transcript  # no "guestkit: insmod X failed" line
    assert "env: GREETING=hello there" in result.transcript
    assert "extra: shipped" in result.transcript
    assert re.search(r"^args: .*iomem=relaxed .*guestkit\.nonce=[0-9a-f]+", result.transcript, re.M)
    assert log.read_text() == result.transcript
    assert result.returncode == 0  # poweroff -f ends QEMU normally
    print(f"boot with 8 modules to script completion: {result.elapsed:.2f} s")


def test_hard_timeout_kills_qemu(guest_kernel: Kernel, qemu72: str) -> None:
    start = time.monotonic()
    with pytest.raises(ProcessFailed) as info:
        boot_script(guest_kernel, GuestScript("echo started; sleep 600\n"), timeout=3)
    took = time.monotonic() - start
    assert took < 3 + 2.5
    assert "within 3 s" in info.value.message
    argv = info.value.details["argv"]
    nonce = next(a for a in argv if "guestkit.nonce=" in a).split("guestkit.nonce=")[1].split()[0]
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            assert nonce not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
