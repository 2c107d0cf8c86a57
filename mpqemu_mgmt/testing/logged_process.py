"""A remote process for tests and benches: spawned on inherited fds, output to a log file, reaped.

The shared shell of :class:`~mpqemu_mgmt.testing.builtin_remote.BuiltinRemote` and
:class:`~mpqemu_mgmt.testing.stock_remote.StockRemote`: :class:`LoggedProcess` spawns ``argv`` with
stdout and stderr appended to ``<workdir>/<name>.log``, closes the parent's copies of the inherited
fds once the child has them (or failed to start), and stops with terminate, kill, reap.
:func:`on_socketpair` hands such a process one end of a fresh AF_UNIX socketpair and yields it
with the other (proxy) end. It must not be used by production code (the service's launcher lives
in ``confine/``) and applies no confinement.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from mpqemu_mgmt.closing import ClosedOnExit


def wait_or_kill(proc: subprocess.Popen[Any], timeout: float) -> bool:
    """Wait up to ``timeout`` for ``proc`` to exit; else SIGKILL it and reap it (again up to
    ``timeout``). True when it exited by itself; the status is ``proc.returncode``."""
    try:
        proc.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
        return False


class LoggedProcess(ClosedOnExit):
    """One child process that owns its log file; ``pass_fds`` are inherited and closed here.
    ``with process:`` stops it on the way out."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        workdir: Path,
        name: str,
        pass_fds: Sequence[int],
        log_argv: bool = False,
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{name}.log"
        self.argv = list(argv)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        if log_argv:
            self._log.write(f"# argv: {shlex.join(self.argv)}\n".encode())
            self._log.flush()
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=self._log,
                pass_fds=tuple(pass_fds),
                close_fds=True,
            )
        except BaseException:
            self._log.close()
            raise
        finally:
            # The child holds its own copies now; ours would keep the peer from ever seeing EOF.
            for fd in pass_fds:
                os.close(fd)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit by itself (e.g. after the proxy end closed)."""
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 5.0) -> int:
        """Terminate, then kill, then reap; close the log. Returns the exit status. Idempotent."""
        if self.proc.poll() is None:
            self.proc.terminate()
            wait_or_kill(self.proc, timeout)
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode

    def close(self) -> None:
        self.stop()


P = TypeVar("P", bound=LoggedProcess)


@contextlib.contextmanager
def on_socketpair(spawn: Callable[[int], P], grace: float) -> Iterator[tuple[P, socket.socket]]:
    """Spawn ``spawn(remote_fd)`` on one end of a socketpair; yield it with the proxy end.

    On the way out the proxy end is closed first (the polite stop: a remote exits on EOF), the
    process gets ``grace`` seconds to exit by itself, then :meth:`LoggedProcess.stop`.
    """
    proxy_end, remote_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        remote = spawn(remote_end.detach())
    except BaseException:
        proxy_end.close()
        raise
    try:
        yield remote, proxy_end
    finally:
        proxy_end.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            remote.wait(grace)
        remote.stop()
