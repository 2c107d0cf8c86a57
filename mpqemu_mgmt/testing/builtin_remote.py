"""Spawn the in-tree remote (``python -m mpqemu_mgmt.remote``) on a socketpair, for tests and benches.

The counterpart of :mod:`mpqemu_mgmt.testing.stock_remote` for our own emulator: the same
:class:`~mpqemu_mgmt.testing.logged_process.LoggedProcess` shape (``pair()`` yields the process and
the proxy end, stderr captured to a log file, a stop that terminates, kills and reaps). It must not
be used by production code (the service's launcher lives in ``confine/``); it applies no
confinement beyond the remote's own ``--seccomp`` option.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from mpqemu_mgmt.testing.logged_process import LoggedProcess, on_socketpair


class BuiltinRemote(LoggedProcess):
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
        argv = [
            python, "-m", "mpqemu_mgmt.remote",
            "--device", model, "--fd", str(remote_fd), "--seccomp", seccomp,
            *(["--qmp-fd", str(qmp_fd)] if qmp_fd is not None else []),
            *extra_args,
        ]  # fmt: skip
        keep = (remote_fd,) + ((qmp_fd,) if qmp_fd is not None else ())
        super().__init__(argv, workdir=workdir, name=name, pass_fds=keep)

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
        def spawn(remote_fd: int) -> BuiltinRemote:
            return cls(
                model,
                remote_fd,
                workdir=workdir,
                seccomp=seccomp,
                qmp_fd=qmp_listener.detach() if qmp_listener is not None else None,
                extra_args=extra_args,
                name=name,
            )

        with on_socketpair(spawn, grace=2.0) as pair:
            yield pair


def device_status(qmp_path: str | Path, timeout: float = 10.0) -> dict[str, Any]:
    """``x-device-status`` from an in-tree remote's QMP monitor, over a plain socket (a test
    client: greeting, ``qmp_capabilities``, the command)."""
    with socket.socket(socket.AF_UNIX) as c:
        c.settimeout(timeout)
        c.connect(str(qmp_path))
        with c.makefile("rwb") as f:
            f.readline()  # the greeting
            f.write(b'{"execute": "qmp_capabilities"}\n{"execute": "x-device-status"}\n')
            f.flush()
            f.readline()
            status: dict[str, Any] = json.loads(f.readline())["return"]
            return status
