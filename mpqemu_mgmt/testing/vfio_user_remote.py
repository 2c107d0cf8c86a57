"""Start one of our remotes behind QEMU's ``vfio-user-pci`` the way the manager hands it over.

The vfio-user client in QEMU 10.1+ only connects to a UNIX socket *path* (``"socket": {"type":
"unix", "path": …}``; a passed fd is refused, protocol.md §8). So: listen in a private 0700
directory, let QEMU connect (at realize: cold-plug start-up or ``device_add``), accept, unlink the
path at once, and start ``python -m mpqemu_mgmt.remote --transport vfio-user --fd N`` on the
accepted socket. The confined remote never sees a path and never calls ``accept``.

Test and benchmark tooling (an IO shell); the orchestration layer does the same in production.
It must not be imported by the remote or the service, and it applies no confinement beyond the
remote's own ``--seccomp``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from mpqemu_mgmt.errors import ProcessFailed
from mpqemu_mgmt.testing.logged_process import wait_or_kill


class VfioUserRemote:
    """A listening socket for QEMU and, once it connects, our remote serving ``model`` on it."""

    def __init__(
        self,
        model: str,
        dev_id: str,
        *,
        backing: Path | None = None,
        seccomp: str = "enforce",
        workdir: Path | None = None,
        extra_args: Sequence[str] = (),
        accept_timeout: float = 60.0,
        qmp: bool = False,
    ) -> None:
        self.model = model
        self.dev_id = dev_id
        self.dir = Path(tempfile.mkdtemp(prefix="vfio-user-", dir=workdir))
        os.chmod(self.dir, 0o700)
        self.path = self.dir / f"{dev_id}.sock"
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.path))
        self._listener.listen(1)
        self._listener.settimeout(accept_timeout)
        self.backing = backing
        self.seccomp = seccomp
        self.extra_args = tuple(extra_args)
        #: the remote's own QMP monitor (heartbeat, x-device-status), when asked for
        self.qmp_path = self.dir / f"{dev_id}.qmp" if qmp else None
        if self.qmp_path is not None:
            self.extra_args += ("--qmp", str(self.qmp_path))
        self.stderr_path = self.dir / f"{dev_id}.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._accept_and_spawn, daemon=True)
        self._thread.start()

    def device_json(self) -> str:
        """The ``-device`` / ``device_add`` argument for QEMU 11.1's vfio-user-pci."""
        return json.dumps(
            {"driver": "vfio-user-pci", "id": self.dev_id, "socket": {"type": "unix", "path": str(self.path)}}
        )

    def _accept_and_spawn(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError as exc:
            self.error = exc
            return
        finally:
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # no world-reachable path once QEMU is connected
        try:
            argv = [
                sys.executable, "-m", "mpqemu_mgmt.remote", "--device", self.model,
                "--fd", str(conn.fileno()), "--transport", "vfio-user", "--seccomp", self.seccomp,
                *self.extra_args,
            ]
            keep = [conn.fileno()]
            backing_fd = None
            if self.backing is not None:
                backing_fd = os.open(self.backing, os.O_RDWR | os.O_CLOEXEC)
                argv += ["--backing-fd", str(backing_fd)]
                keep.append(backing_fd)
            with open(self.stderr_path, "wb") as err:
                self.proc = subprocess.Popen(argv, pass_fds=keep, stderr=err, start_new_session=True)
            if backing_fd is not None:
                os.close(backing_fd)
        except BaseException as exc:
            self.error = exc
        finally:
            conn.close()

    def wait_connected(self, timeout: float) -> subprocess.Popen[bytes]:
        self._thread.join(timeout)
        if self.proc is None:
            raise ProcessFailed(f"vfio-user remote {self.dev_id} never started", error=str(self.error))
        return self.proc

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def close(self, timeout: float = 10.0) -> int | None:
        """Wait for the remote to exit (QEMU gone means EOF on its socket); kill it if it hangs."""
        with contextlib.suppress(OSError):
            self._listener.close()
        rc = None
        if self.proc is not None and wait_or_kill(self.proc, timeout):
            rc = self.proc.returncode  # None when it hung and was killed
        self._thread.join(1)
        shutil.rmtree(self.dir, ignore_errors=True)
        return rc

    def __enter__(self) -> VfioUserRemote:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
