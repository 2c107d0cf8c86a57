"""Spawn the in-tree remote (``python -m mpqemu_mgmt.remote``) on a socketpair, for tests and benches.

The counterpart of :mod:`mpqemu_mgmt.testing.stock_remote` for our own emulator: same shape
(``pair()`` yields the process and the proxy end), stderr captured to a log file, and a stop that
terminates, kills and reaps. It must not be used by production code (the service's launcher lives
in ``confine/``); it applies no confinement beyond the remote's own ``--seccomp`` option.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path


class BuiltinRemote:
    """One in-tree remote process serving ``model`` on ``remote_fd`` (inherited, closed here)."""

    def __init__(
        self,
        model: str,
        remote_fd: int,
        *,
        workdir: Path,
        seccomp: str = "off",
        qmp_fd: int | None = None,
        extra_args: Sequence[str] = (),
        python: str = sys.executable,
        name: str = "builtin",
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{name}.log"
        self.argv = [
            python, "-m", "mpqemu_mgmt.remote",
            "--device", model, "--fd", str(remote_fd), "--seccomp", seccomp,
            *(["--qmp-fd", str(qmp_fd)] if qmp_fd is not None else []),
            *extra_args,
        ]  # fmt: skip
        keep = (remote_fd,) + ((qmp_fd,) if qmp_fd is not None else ())
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=self._log,
                pass_fds=keep,
                close_fds=True,
            )
        except BaseException:
            self._log.close()
            raise
        finally:
            for fd in keep:
                os.close(fd)

    @classmethod
    @contextlib.contextmanager
    def pair(
        cls,
        model: str = "pci-testdev",
        *,
        workdir: Path,
        seccomp: str = "off",
        qmp_listener: socket.socket | None = None,
        extra_args: Sequence[str] = (),
        name: str = "builtin",
    ) -> Iterator[tuple[BuiltinRemote, socket.socket]]:
        proxy_end, remote_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            remote = cls(
                model,
                remote_end.detach(),
                workdir=workdir,
                seccomp=seccomp,
                qmp_fd=qmp_listener.detach() if qmp_listener is not None else None,
                extra_args=extra_args,
                name=name,
            )
        except BaseException:
            proxy_end.close()
            raise
        try:
            yield remote, proxy_end
        finally:
            proxy_end.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                remote.proc.wait(2.0)
            remote.stop()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 5.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode
