"""The audit log: one JSON line per mutation: when, who (peer uid/pid via SO_PEERCRED), which
command, which QMP/libvirt calls it made, and the result. IO shell; must not decide anything.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpqemu_mgmt.service.events import terminate_torn_line


@dataclass
class AuditEntry:
    command: str
    args: dict[str, Any]
    uid: int | None
    pid: int | None
    time: float = 0.0
    calls: list[str] = field(default_factory=list)  # "qmp device_add {...}", "libvirt createWithFlags"
    result: str = "ok"  # ok | unchanged | error
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"time": round(self.time, 6), "uid": self.uid, "pid": self.pid, "command": self.command,
                "args": self.args, "calls": self.calls, "result": self.result, "error": self.error}


class AuditLog:
    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        terminate_torn_line(path)

    def begin(self, command: str, args: dict[str, Any], uid: int | None, pid: int | None) -> AuditEntry:
        return AuditEntry(command=command, args=args, uid=uid, pid=pid, time=self.clock())

    def write(self, entry: AuditEntry) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(entry.to_dict(), sort_keys=True, default=str) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)


def read_audit(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
