"""Build the bubblewrap command line that puts one remote in its own namespaces: pure.

The sandbox (confinement.md §8.1 step 5, crosvm ``create_sandbox_minijail``):
``--unshare-all`` (user, pid, net, ipc, uts, cgroup-try) plus an explicit user namespace with
``--disable-userns`` (no nested user namespaces), ``--die-with-parent``, ``--new-session``
(TIOCSTI, CVE-2017-5226), ``--cap-drop ALL``, ``--clearenv``, ``--info-fd`` (reports the host pid
of bwrap's pid-1 reaper; the device is its only child), and a minimal
read-only root: ``/usr`` with the merged-usr symlinks, the read-only paths the caller lists (code,
venv, ld.so.cache), ``/proc``, a minimal ``/dev`` and a small tmpfs ``/tmp``.

Must not run anything, look at the host or decide which paths to expose: the launcher passes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mpqemu_mgmt.errors import UsageError

#: namespaces bwrap creates with the flags below (reported in ``confinement.namespaces``)
NAMESPACES: tuple[str, ...] = ("user", "pid", "net", "ipc", "uts", "cgroup", "mnt")

#: environment inside the sandbox (everything else is cleared)
SANDBOX_ENV: tuple[tuple[str, str], ...] = (("PATH", "/usr/bin"), ("LANG", "C.UTF-8"))

#: tmpfs /tmp size: a remote writes no files
TMP_SIZE = 1 << 20


@dataclass(frozen=True, slots=True)
class Sandbox:
    """What the sandbox exposes; every path is a host path mounted at the same place."""

    ro_binds: tuple[str, ...] = ()
    #: (target, link) pairs, e.g. ("usr/lib", "/lib") for a merged-/usr host
    symlinks: tuple[tuple[str, str], ...] = ()
    die_with_parent: bool = True


def bwrap_argv(bwrap: str, sandbox: Sandbox, inner: Sequence[str], *, info_fd: int | str) -> list[str]:
    """``bwrap ... -- inner...``; ``info_fd`` is the write end bwrap reports the child pid on (a
    number, or a plan's ``{fd:info}`` placeholder)."""
    if not inner:
        raise UsageError("empty command for the sandbox: bwrap needs a program to run")
    argv = [
        bwrap,
        "--unshare-all",
        "--unshare-user",
        "--disable-userns",
        "--new-session",
        "--cap-drop", "ALL",
        "--clearenv",
    ]
    if sandbox.die_with_parent:
        argv.append("--die-with-parent")
    for key, value in SANDBOX_ENV:
        argv += ["--setenv", key, value]
    argv += ["--ro-bind", "/usr", "/usr"]
    for target, link in sandbox.symlinks:
        argv += ["--symlink", target, link]
    # bwrap applies its operations in order: the tmpfs /tmp comes before the code binds, so a
    # checkout or venv that lives under /tmp is bound on top of it instead of being hidden by it.
    argv += ["--size", str(TMP_SIZE), "--tmpfs", "/tmp"]
    for path in sandbox.ro_binds:
        argv += ["--ro-bind", path, path]
    argv += [
        "--proc", "/proc",
        "--dev", "/dev",
        "--chdir", "/",
        "--info-fd", str(info_fd),
        "--",
        *inner,
    ]
    return argv
