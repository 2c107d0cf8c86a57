"""What a running guest is made of, as plain data the service can save and give back to ``adopt``.

:class:`GuestRuntime` names the main QEMU (pid, QMP socket, console log) and, per device, the
:class:`RemoteRuntime` (pid, pidfd, QMP socket, log, confinement). ``to_record()`` is JSON-ready;
``GuestRuntime.from_record`` reads it back (pidfds are not saved: ``adopt`` reopens them). Must not
do IO; the drivers own the processes behind these records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mpqemu_mgmt.domain.spec import GuestSpec, spec_from_dict
from mpqemu_mgmt.domain.topology import Placement


@dataclass
class RemoteRuntime:
    """One remote device process (what confine.launcher's LaunchedRemote reports, plus our ids)."""

    device_id: str
    pid: int
    qmp_path: str
    log_path: str
    argv: tuple[str, ...] = ()
    #: ``{"seccomp": ..., "namespaces": [...], "uid": ...}`` as the launcher applied it.
    confinement: dict[str, Any] = field(default_factory=dict)
    #: A pidfd for this process when we hold one (not saved; reopened on adopt).
    pidfd: int | None = None
    placement: Placement | None = None
    #: The fd numbers the remote inherited, by the plan's placeholder name (``{fd:sock}`` → 5):
    #: the plan's argv with these substituted is ``argv`` (not saved).
    fds: dict[str, int] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "device_id": self.device_id, "pid": self.pid, "qmp_path": self.qmp_path,
            "log_path": self.log_path, "argv": list(self.argv), "confinement": dict(self.confinement),
        }
        if self.placement is not None:
            out["placement"] = {"bus": self.placement.bus, "slot": self.placement.slot}
        return out

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> RemoteRuntime:
        place = rec.get("placement")
        return cls(
            device_id=str(rec["device_id"]), pid=int(rec["pid"]), qmp_path=str(rec["qmp_path"]),
            log_path=str(rec["log_path"]), argv=tuple(rec.get("argv", ())),
            confinement=dict(rec.get("confinement", {})),
            placement=Placement(str(place["bus"]), int(place["slot"])) if place else None,
        )


@dataclass
class GuestRuntime:
    """A started guest: its spec as it is now (devices attached since start included)."""

    spec: GuestSpec
    driver: str
    state_dir: str
    #: Main QEMU pid (under libvirt: read from libvirt's pid file; 0 when unknown).
    pid: int
    #: Main QEMU's QMP socket (direct driver); None under libvirt, which owns the monitor.
    qmp_path: str | None
    console_log: str
    remotes: dict[str, RemoteRuntime] = field(default_factory=dict)
    pidfd: int | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def placements(self) -> dict[str, Placement]:
        return {k: r.placement for k, r in self.remotes.items() if r.placement is not None}

    def to_record(self) -> dict[str, Any]:
        return {
            "name": self.spec.name, "driver": self.driver, "state_dir": self.state_dir, "pid": self.pid,
            "qmp_path": self.qmp_path, "console_log": self.console_log, "spec": self.spec.to_dict(),
            "remotes": {k: r.to_record() for k, r in self.remotes.items()},
        }

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> GuestRuntime:
        return cls(
            spec=spec_from_dict(rec["spec"], f"<record of {rec.get('name', '?')}>"),
            driver=str(rec["driver"]), state_dir=str(rec["state_dir"]), pid=int(rec["pid"]),
            qmp_path=rec.get("qmp_path"), console_log=str(rec["console_log"]),
            remotes={k: RemoteRuntime.from_record(v) for k, v in rec.get("remotes", {}).items()},
        )
