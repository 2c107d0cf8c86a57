"""Guest and device records: what the service knows, as frozen data with a stable JSON form.

Pure: no IO, no clock. The records are what the state store writes, what ``status`` and ``list``
print (DESIGN.md Contract 4 fields) and what re-adoption reads back after a service restart. A
process is identified by ``(pid, start_time)`` (field 22 of /proc/PID/stat) so a recycled pid is
never mistaken for ours.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

GUEST_STATES = ("defined", "starting", "running", "paused", "stopping", "stopped", "crashed", "failed")


@dataclass(frozen=True)
class ProcRecord:
    pid: int
    start_time: int = 0  # clock ticks since boot (proc(5) stat field 22); 0 = unknown
    qmp: str | None = None  # its QMP monitor socket, for the heartbeat and for re-adoption
    log: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "start_time": self.start_time, "qmp": self.qmp, "log": self.log}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ProcRecord | None:
        if not d:
            return None
        return cls(pid=int(d["pid"]), start_time=int(d.get("start_time", 0)), qmp=d.get("qmp"),
                   log=d.get("log"))


@dataclass(frozen=True)
class DeviceRecord:
    id: str
    model: str
    backend: str = "builtin"
    on_failure: str = "replug"
    proc: ProcRecord | None = None
    health: str = "stopped"
    restarts: int = 0
    confinement: dict[str, Any] = field(default_factory=dict)
    qdev_id: str = ""  # the proxy's id in the main QEMU (changes on replug: a fresh device)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "model": self.model, "backend": self.backend, "on_failure": self.on_failure,
            "proc": self.proc.to_dict() if self.proc else None, "health": self.health,
            "restarts": self.restarts, "confinement": self.confinement, "qdev_id": self.qdev_id,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceRecord:
        return cls(id=d["id"], model=d["model"], backend=d.get("backend", "builtin"),
                   on_failure=d.get("on_failure", "replug"), proc=ProcRecord.from_dict(d.get("proc")),
                   health=d.get("health", "stopped"), restarts=int(d.get("restarts", 0)),
                   confinement=dict(d.get("confinement") or {}), qdev_id=d.get("qdev_id", ""))

    def status(self) -> dict[str, Any]:
        """One entry of ``status --format json``'s ``devices`` (Contract 4)."""
        conf = self.confinement
        return {
            "id": self.id, "model": self.model, "backend": self.backend,
            "pid": self.proc.pid if self.proc else None, "health": self.health, "restarts": self.restarts,
            "on_failure": self.on_failure,
            "confinement": {"seccomp": conf.get("seccomp"), "namespaces": conf.get("namespaces", []),
                            "uid": conf.get("uid"), **{k: v for k, v in conf.items()
                                                       if k not in ("seccomp", "namespaces", "uid")}},
        }


@dataclass(frozen=True)
class GuestRecord:
    name: str
    spec: dict[str, Any]  # the guest spec's tables (GuestSpec.to_dict), the source of truth
    state: str = "defined"
    driver: str = "direct"
    main: ProcRecord | None = None
    devices: tuple[DeviceRecord, ...] = ()
    generation: int = 0  # bumped by every write; lets readers spot a stale copy
    driver_data: dict[str, Any] = field(default_factory=dict)  # what the driver needs to adopt
    reason: str = ""  # why the guest is in its state (crashed: which process, failed: which step)

    def device(self, dev_id: str) -> DeviceRecord | None:
        return next((d for d in self.devices if d.id == dev_id), None)

    def with_device(self, dev: DeviceRecord) -> GuestRecord:
        devices = [d for d in self.devices if d.id != dev.id]
        idx = next((i for i, d in enumerate(self.devices) if d.id == dev.id), len(devices))
        devices.insert(idx, dev)
        return replace(self, devices=tuple(devices))

    def without_device(self, dev_id: str) -> GuestRecord:
        return replace(self, devices=tuple(d for d in self.devices if d.id != dev_id))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "spec": self.spec, "state": self.state, "driver": self.driver,
            "main": self.main.to_dict() if self.main else None,
            "devices": [d.to_dict() for d in self.devices], "generation": self.generation,
            "driver_data": self.driver_data, "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GuestRecord:
        return cls(name=d["name"], spec=dict(d.get("spec") or {}), state=d.get("state", "defined"),
                   driver=d.get("driver", "direct"), main=ProcRecord.from_dict(d.get("main")),
                   devices=tuple(DeviceRecord.from_dict(x) for x in d.get("devices", [])),
                   generation=int(d.get("generation", 0)), driver_data=dict(d.get("driver_data") or {}),
                   reason=d.get("reason", ""))

    def status(self) -> dict[str, Any]:
        """``status NAME --format json`` (Contract 4)."""
        return {
            "name": self.name, "state": self.state, "driver": self.driver,
            "pid": self.main.pid if self.main else None, "reason": self.reason,
            "console": self.main.log if self.main else None,
            "devices": [d.status() for d in self.devices],
        }

    def summary(self) -> dict[str, Any]:
        """One row of ``list``."""
        unhealthy = [d.id for d in self.devices if d.health not in ("healthy", "stopped", "starting")]
        return {"name": self.name, "state": self.state, "driver": self.driver,
                "devices": len(self.devices), "unhealthy": ",".join(unhealthy),
                "restarts": sum(d.restarts for d in self.devices)}
