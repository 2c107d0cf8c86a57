"""What confinement to apply to one remote process: pure, frozen data and its validation.

A :class:`ConfinementProfile` says which seccomp mode the remote loads, which host uid/gid it
drops to, which rlimits it gets and which namespaces bubblewrap gives it. The launcher reads it;
``mpqemu-mgmt status`` reports the matching :class:`AppliedConfinement`. The stock-QEMU profile
(``policies/qemu-remote.toml``) is parsed by :func:`parse_qemu_profile` from its text.

This module must not do IO: no file reads, no user lookups, no process control.
"""

from __future__ import annotations

import enum
import tomllib
from dataclasses import dataclass, field, replace
from typing import Any

from mpqemu_mgmt.errors import UsageError

#: The dedicated system user remotes run as (created by the launcher when missing).
DEFAULT_USER = "mpqemu-remote"

#: Stock QEMU's own filter for ``backend = "qemu"``: the libvirt default (qemu.conf
#: ``seccomp_sandbox = 1`` → ``-sandbox on,obsolete=deny,...``; qemu system/qemu-seccomp.c).
QEMU_SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


class SeccompMode(enum.StrEnum):
    """``--seccomp`` of the remote (confinement.md §8.3)."""

    ENFORCE = "enforce"  # default KILL_PROCESS, all threads (TSYNC)
    LOG = "log"  # default LOG: nothing blocked, every off-list call audited
    ERRNO = "errno"  # default ERRNO(EPERM), denials still logged
    OFF = "off"  # development only; loud warning

    @classmethod
    def parse(cls, value: str) -> SeccompMode:
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(m.value for m in cls)
            raise UsageError(f"seccomp mode must be one of {choices}, got {value!r}") from None


@dataclass(frozen=True, slots=True)
class Rlimits:
    """Resource limits, soft = hard (only ever lowered: root here lacks CAP_SYS_RESOURCE)."""

    nofile: int = 64  # crosvm 1024, Firecracker 2048; a remote holds < 20 fds
    core: int = 0  # guest RAM must never reach a core file
    fsize: int = 64 << 20  # caps the log; raised to the largest backing file by the launcher
    data: int = 1 << 30  # RLIMIT_DATA, not AS: the shared guest RAM mappings are MAP_SHARED
    nproc: int = 256  # counted per uid across all remotes sharing the dedicated user

    def as_pairs(self) -> dict[str, int]:
        return {"nofile": self.nofile, "core": self.core, "fsize": self.fsize,
                "data": self.data, "nproc": self.nproc}


@dataclass(frozen=True, slots=True)
class ConfinementProfile:
    """Everything the launcher applies around one remote process."""

    seccomp: SeccompMode = SeccompMode.ENFORCE
    #: host user name to drop to when the manager is root; ``uid``/``gid`` override it
    user: str = DEFAULT_USER
    uid: int | None = None
    gid: int | None = None
    rlimits: Rlimits = field(default_factory=Rlimits)
    #: wrap in bubblewrap namespaces (user, pid, net, ipc, uts, cgroup, mount)
    namespaces: bool = True
    #: bwrap --die-with-parent: the remote gets SIGKILL when its launcher dies. PR_SET_PDEATHSIG
    #: follows the *thread* that spawned it (prctl(2)), so launch from a long-lived thread.
    die_with_parent: bool = True
    bwrap: str = "bwrap"
    #: extra read-only host paths visible inside (beyond /usr, the code and the venv)
    ro_binds: tuple[str, ...] = ()
    #: QEMU's ``-sandbox`` argument for stock QEMU remotes
    qemu_sandbox: str = QEMU_SANDBOX
    #: seconds to wait for bwrap to report the child pid
    start_timeout: float = 10.0

    def __post_init__(self) -> None:
        if (self.uid is None) != (self.gid is None):
            raise UsageError("confinement profile: give both uid and gid, or neither")
        if self.uid == 0 or self.gid == 0:
            raise UsageError("confinement profile: a remote never runs as uid/gid 0")

    def with_seccomp(self, mode: SeccompMode | str) -> ConfinementProfile:
        return replace(self, seccomp=SeccompMode.parse(str(mode)))


@dataclass(frozen=True, slots=True)
class AppliedConfinement:
    """What was actually applied (Contracts 4: ``confinement: {seccomp, namespaces, uid}``)."""

    seccomp: str  # enforce | log | errno | off | "qemu-sandbox"
    namespaces: tuple[str, ...]  # e.g. ("user", "pid", "net", "ipc", "uts", "cgroup", "mnt")
    uid: int

    def to_dict(self) -> dict[str, Any]:
        return {"seccomp": self.seccomp, "namespaces": list(self.namespaces), "uid": self.uid}


def parse_qemu_profile(text: str, base: ConfinementProfile | None = None) -> ConfinementProfile:
    """Apply the ``[rlimits]`` and ``sandbox`` keys of ``qemu-remote.toml`` onto ``base``."""
    base = base or ConfinementProfile()
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"qemu confinement profile: {exc}") from exc
    unknown = set(data) - {"sandbox", "rlimits", "ro_binds"}
    if unknown:
        raise UsageError(f"qemu confinement profile: unknown keys {sorted(unknown)}")
    limits = data.get("rlimits", {})
    bad = set(limits) - set(Rlimits().as_pairs())
    if bad:
        raise UsageError(f"qemu confinement profile: unknown rlimits {sorted(bad)}")
    return replace(
        base,
        qemu_sandbox=str(data.get("sandbox", base.qemu_sandbox)),
        rlimits=replace(base.rlimits, **{k: int(v) for k, v in limits.items()}),
        ro_binds=tuple(str(p) for p in data.get("ro_binds", base.ro_binds)),
    )
