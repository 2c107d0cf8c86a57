"""Events: every state transition of a guest or a device, as JSON lines in the state directory.

The daemon appends; ``mpqemu-mgmt events [NAME] [--follow]`` reads the file (no service needed)
and ``--follow`` tails it. Must not interpret events.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Event:
    kind: str  # defined, starting, running, stopped, crashed, healthy, hung, dead, replugged, ...
    guest: str
    device: str | None = None
    detail: str = ""
    time: float = 0.0  # wall clock, seconds since the epoch
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"time": round(self.time, 6), "guest": self.guest, "device": self.device,
                               "kind": self.kind, "detail": self.detail}
        if self.data:
            out["data"] = self.data
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Event:
        return cls(kind=str(d.get("kind", "")), guest=str(d.get("guest", "")), device=d.get("device"),
                   detail=str(d.get("detail", "")), time=float(d.get("time", 0.0)),
                   data=dict(d.get("data") or {}))


class EventLog:
    """Append-only JSON lines; each line is written with one ``write`` so lines never interleave."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self.listeners: list[Callable[[Event], None]] = []
        terminate_torn_line(path)


    def emit(self, kind: str, guest: str, device: str | None = None, detail: str = "",
             **data: Any) -> Event:
        event = Event(kind=kind, guest=guest, device=device, detail=detail, time=self.clock(), data=data)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(event.to_dict(), sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
        for listener in list(self.listeners):
            listener(event)
        return event


def terminate_torn_line(path: Path) -> None:
    """After a crash mid-write the last line may lack its newline; end it so the next line parses."""
    try:
        with path.open("rb+") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
    except FileNotFoundError:
        pass


def read_events(path: Path, guest: str | None = None) -> list[Event]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            ev = Event.from_dict(json.loads(line))
        except ValueError:
            continue  # a torn last line after a crash is skipped, not fatal
        if guest is None or ev.guest == guest:
            out.append(ev)
    return out


def follow_events(path: Path, guest: str | None = None, poll: float = 0.1,
                  stop: Callable[[], bool] = lambda: False) -> Iterator[Event]:
    """Yield the existing events, then new ones as they are appended, until ``stop()``."""
    pos = 0
    buf = b""
    while not stop():
        try:
            with path.open("rb") as f:
                f.seek(pos)
                chunk = f.read()
        except FileNotFoundError:
            chunk = b""
        if chunk:
            pos += len(chunk)
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                try:
                    ev = Event.from_dict(json.loads(line))
                except ValueError:
                    continue
                if guest is None or ev.guest == guest:
                    yield ev
        else:
            time.sleep(poll)
