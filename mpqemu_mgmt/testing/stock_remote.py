"""Launch a stock QEMU ``-machine x-remote`` process serving one PCI device on an inherited socket.

This is the reference peer for interop tests, golden-vector recording and benchmarks: it spawns
``qemu-system-x86_64 -machine x-remote -nodefaults -display none -device <dev>
-object x-remote-object,id=…,devid=<id>,fd=N`` (the working recipe of protocol.md §6 and QEMU's
``tests/avocado/multiprocess.py``), optionally with a QMP monitor on a listening UNIX socket, and
captures stderr to a log file. It must not speak the mpqemu protocol itself (that is ProxySim's job)
and must not be used by production code; the production launcher lives in ``confine/``.

Typical use::

    with StockRemote.pair("pci-testdev", workdir=tmp_path) as (remote, sock):
        settle(remote)
        ...talk mpqemu over ``sock``...
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mpqemu_mgmt.errors import ProcessFailed
from mpqemu_mgmt.testing.logged_process import LoggedProcess, on_socketpair

DEFAULT_QEMU = "qemu-system-x86_64"
_ID_RE = re.compile(r"(?:^|,)id=([^,]+)")

# protocol.md §4.x: 7.2 serves the socket before its initial machine reset; without a monitor to
# ask, half a second is ample for that reset to have happened.
SETTLE_SECONDS = 0.5


def device_id(device: str) -> tuple[str, str]:
    """Return ``(device_args, id)``, adding ``id=mpqdev0`` when the args carry no ``id=``.

    ``x-remote-object`` finds its device by qdev id (hw/remote/remote-obj.c), so one is mandatory.
    """
    match = _ID_RE.search(device)
    if match:
        return device, match.group(1)
    return f"{device},id=mpqdev0", "mpqdev0"


class StockRemote(LoggedProcess):
    """One stock x-remote process; owns the process, its log file and (optionally) its QMP path.

    ``remote_fd`` is the remote end of a connected AF_UNIX SOCK_STREAM pair. It is inherited by the
    child under the same number and the parent's copy is closed once the child runs, so the proxy
    end sees EOF when QEMU exits.
    """

    def __init__(
        self,
        device: str,
        remote_fd: int,
        *,
        workdir: Path,
        qmp: bool = False,
        qemu_binary: Sequence[str] | str = DEFAULT_QEMU,
        extra_args: Sequence[str] = (),
        name: str = "remote",
    ) -> None:
        self.device, self.devid = device_id(device)
        self.qmp_path: Path | None = Path(workdir) / f"{name}.qmp" if qmp else None
        prefix = [qemu_binary] if isinstance(qemu_binary, str) else list(qemu_binary)
        argv: list[str] = [
            *prefix,
            "-machine", "x-remote",
            "-nodefaults",
            "-display", "none",
            "-device", self.device,
            "-object", f"x-remote-object,id=robj-{self.devid},devid={self.devid},fd={remote_fd}",
            *extra_args,
        ]
        if self.qmp_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.qmp_path.unlink()
            argv += ["-qmp", f"unix:{self.qmp_path},server=on,wait=off"]
        super().__init__(argv, workdir=workdir, name=name, pass_fds=(remote_fd,), log_argv=True)

    @classmethod
    @contextlib.contextmanager
    def pair(
        cls,
        device: str = "pci-testdev",
        *,
        workdir: Path,
        qmp: bool = False,
        qemu_binary: Sequence[str] | str = DEFAULT_QEMU,
        extra_args: Sequence[str] = (),
        name: str = "remote",
    ) -> Iterator[tuple[StockRemote, socket.socket]]:
        """Make a socketpair, spawn the remote on one end and yield it with the proxy end."""

        def spawn(remote_fd: int) -> StockRemote:
            return cls(
                device,
                remote_fd,
                workdir=workdir,
                qmp=qmp,
                qemu_binary=qemu_binary,
                extra_args=extra_args,
                name=name,
            )

        # Closing our end is the polite stop: 7.2 exits on EOF (protocol.md §3.7).
        with on_socketpair(spawn, grace=1.0) as pair:
            yield pair

    # -- QMP (only a tiny synchronous client: enough to settle and to query) --------------------

    def qmp_command(self, command: str, timeout: float = 5.0, **arguments: Any) -> Any:
        """Run one QMP command on a fresh connection and return its ``return`` value."""
        if self.qmp_path is None:
            raise ProcessFailed("this remote was started without a QMP socket", pid=self.pid)
        deadline = time.monotonic() + timeout
        while True:
            try:
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                conn.settimeout(max(0.05, deadline - time.monotonic()))
                conn.connect(str(self.qmp_path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                conn.close()
                if not self.alive() or time.monotonic() > deadline:
                    raise ProcessFailed(
                        "stock remote QMP socket never came up", pid=self.pid, log=str(self.log_path)
                    ) from None
                time.sleep(0.02)
        with conn, conn.makefile("rwb") as stream:
            try:
                _read_reply(stream)  # greeting
                for cmd, args in (("qmp_capabilities", {}), (command, arguments)):
                    stream.write(json.dumps({"execute": cmd, "arguments": args}).encode() + b"\n")
                    stream.flush()
                    reply = _read_reply(stream)
            except (OSError, ValueError) as exc:
                raise ProcessFailed(f"QMP {command} failed: {exc}", pid=self.pid) from exc
        if "error" in reply:
            raise ProcessFailed(f"QMP {command} failed: {reply['error']}", pid=self.pid)
        return reply["return"]


def _read_reply(stream: Any) -> dict[str, Any]:
    """Read lines until a greeting, a return or an error (events are skipped)."""
    while True:
        line = stream.readline()
        if not line:
            raise ValueError("QMP connection closed")
        msg: dict[str, Any] = json.loads(line)
        if "QMP" in msg or "return" in msg or "error" in msg:
            return msg


def settle(remote: StockRemote, timeout: float = 5.0) -> None:
    """Wait out 7.2's start-up window (protocol.md §4.x) so config writes are not undone.

    Why the window exists: qdev_machine_creation_done (hw/core/machine.c) first notifies the
    machine-init-done listeners (x-remote-object starts its message coroutine there and handles
    whatever is already queued) and only then calls qemu_system_reset. In-band QMP commands are
    dispatched from the main loop, which runs after that, so an answered ``query-status`` proves
    the reset is behind us. Without QMP we can only wait a fixed time.
    """
    if not remote.alive():
        raise ProcessFailed("stock remote exited during start-up", pid=remote.pid, log=remote.log_text())
    if remote.qmp_path is not None:
        remote.qmp_command("query-status", timeout=timeout)
    else:
        time.sleep(SETTLE_SECONDS)
    if not remote.alive():
        raise ProcessFailed("stock remote exited during start-up", pid=remote.pid, log=remote.log_text())
