"""Who a remote runs as, and with which resource limits.

* The host uid/gid: when the manager is root, a dedicated unprivileged system user
  (``mpqemu-remote``, created with ``useradd --system`` when missing) or the configured uid/gid.
  The drop happens *before* bwrap creates the user namespace: otherwise the sandbox's uid maps
  back to host uid 0 (confinement.md §7.9).
* rlimits: applied by util-linux ``prlimit --LIMIT=N:N -- cmd`` at the front of the command, so
  no Python code (``preexec_fn``) runs between fork and exec in a possibly threaded manager.
  Limits are only ever lowered (root here lacks CAP_SYS_RESOURCE, §5.6).

IO shell: reads the user database and may run useradd. Must not spawn the remote itself.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass

from mpqemu_mgmt.confine.profile import ConfinementProfile, Rlimits
from mpqemu_mgmt.errors import ConfinementError


@dataclass(frozen=True, slots=True)
class Credentials:
    """The host ids to drop to; ``drop`` is False when the manager is not root (nothing to drop)."""

    uid: int
    gid: int
    drop: bool


def ensure_user(name: str) -> tuple[int, int]:
    """uid and gid of system user ``name``, creating it (root only) when missing."""
    try:
        entry = pwd.getpwnam(name)
        return entry.pw_uid, entry.pw_gid
    except KeyError:
        pass
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    result = subprocess.run(
        [useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
         "--shell", "/usr/sbin/nologin", "--comment", "mpqemu-mgmt remote device processes", name],
        capture_output=True, text=True, timeout=30, check=False)
    try:  # another manager may have created it concurrently: look again either way
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ConfinementError(f"cannot create system user {name!r}: {result.stderr.strip()}",
                               user=name) from None
    return entry.pw_uid, entry.pw_gid


def resolve(profile: ConfinementProfile) -> Credentials:
    """The credentials a remote launched by this process gets under ``profile``."""
    if os.geteuid() != 0:
        return Credentials(os.getuid(), os.getgid(), drop=False)
    if profile.uid is not None and profile.gid is not None:
        return Credentials(profile.uid, profile.gid, drop=True)
    uid, gid = ensure_user(profile.user)
    if uid == 0 or gid == 0:
        raise ConfinementError(f"user {profile.user!r} has uid/gid 0; refusing to run remotes as root")
    try:
        grp.getgrgid(gid)
    except KeyError:
        raise ConfinementError(f"group {gid} of user {profile.user!r} does not exist") from None
    return Credentials(uid, gid, drop=True)


def rlimit_argv(limits: Rlimits, prlimit: str = "prlimit") -> list[str]:
    """``prlimit --nofile=N:N ... --`` (pure); soft = hard so the remote cannot raise them."""
    return [prlimit, *(f"--{name}={value}:{value}" for name, value in limits.as_pairs().items()), "--"]


def unreachable_ancestor(path: str, uid: int, gid: int) -> str | None:
    """The first directory on ``path`` that ``uid``/``gid`` cannot search, or None.

    bwrap runs after the uid drop, so every path it binds into the sandbox must be searchable by
    the dropped uid: a checkout under a 0700 home directory would otherwise fail deep inside bwrap
    with a bare "No such file or directory".
    """
    current = "/"
    for part in [p for p in os.path.normpath(path).split("/") if p]:
        try:
            st = os.stat(current)
        except OSError:
            return current
        if st.st_uid == uid:
            bit = 0o100
        elif st.st_gid == gid:
            bit = 0o010
        else:
            bit = 0o001
        if not st.st_mode & bit:
            return current
        current = os.path.join(current, part)
    return None
