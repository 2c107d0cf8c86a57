"""vfio-user hot-plug on QEMU 11.1 through QMP, the way the manager hands the socket over.

QEMU's vfio-user-pci takes only a UNIX socket path (a getfd-passed fd is refused), so: listen in a
private 0700 directory, ``device_add`` with that path, accept while QEMU's realize waits for the
VERSION reply, unlink the path, start the remote on the accepted fd. Checked here: the fd form is
refused, the device appears in query-pci with the model's IDs, the path is gone, system_reset
reaches the remote as DEVICE_RESET, and the remote exits 0 when QEMU quits.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mpqemu_mgmt.guestkit.qemu11 import Qemu11
from mpqemu_mgmt.testing.vfio_user_remote import VfioUserRemote


class Qmp:
    """Just enough of a QMP client (line-delimited JSON over a UNIX socket)."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.file.readline()
            if not line:
                raise EOFError("QMP closed")
            msg: dict[str, Any] = json.loads(line)
            if "event" not in msg:
                return msg

    def cmd(self, name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        self.file.write(json.dumps({"execute": name, "arguments": args or {}}).encode() + b"\n")
        self.file.flush()
        return self._read()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def qemu11_vm(tmp_path: Path, qemu11: Qemu11) -> Iterator[tuple[Qmp, Path, subprocess.Popen[bytes]]]:
    qmp_path = tmp_path / "qmp.sock"
    argv = [*qemu11.command(binds=[tmp_path]), "-nodefaults", "-display", "none", "-accel", "tcg",
            "-object", "memory-backend-memfd,id=mem,size=128M,share=on",
            "-machine", "pc,memory-backend=mem", "-m", "128M",
            "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    qmp = None
    try:
        qmp = Qmp(qmp_path)
        yield qmp, tmp_path, proc
    finally:
        if qmp is not None:
            qmp.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        if proc.stderr:
            proc.stderr.close()


def remote_status(path: Path) -> dict[str, Any]:
    qmp = Qmp(path)
    try:
        return qmp.cmd("x-device-status")["return"]  # type: ignore[no-any-return]
    finally:
        qmp.close()


def test_hotplug_reset_and_quit(qemu11_vm: tuple[Qmp, Path, subprocess.Popen[bytes]]) -> None:
    qmp, tmp, proc = qemu11_vm
    fd_form = {"driver": "vfio-user-pci", "id": "bad", "socket": {"type": "fd", "str": "x"}}
    refused = qmp.cmd("device_add", fd_form)
    assert "Unsupported socket type fd" in refused["error"]["desc"]

    with VfioUserRemote("pci-testdev", "hp0", workdir=tmp, qmp=True) as remote:
        args = json.loads(remote.device_json())
        reply = qmp.cmd("device_add", args)
        assert reply == {"return": {}}, reply
        remote.wait_connected(10)
        assert not remote.path.exists()  # unlinked as soon as QEMU connected
        pci = qmp.cmd("query-pci")["return"][0]["devices"]
        dev = next(d for d in pci if d.get("qdev_id") == "hp0")
        assert (dev["id"]["vendor"], dev["id"]["device"]) == (0x1B36, 0x0005)
        assert remote.qmp_path is not None
        status = remote_status(remote.qmp_path)
        assert status["transport"] == "vfio-user" and status["messages"]["VERSION"] == 1
        resets = status["messages"].get("DEVICE_RESET", 0)
        assert qmp.cmd("system_reset") == {"return": {}}
        deadline = time.monotonic() + 10
        while remote_status(remote.qmp_path)["messages"].get("DEVICE_RESET", 0) <= resets:
            assert time.monotonic() < deadline, "system_reset did not reach the remote"
            time.sleep(0.1)
        qmp.cmd("quit")
        proc.wait(20)
        assert remote.close() == 0, remote.stderr()
