"""The state store: one JSON file per guest, written atomically (write, fsync, rename, fsync dir).

A reader, a crash or a SIGKILL at any moment sees either the old record or the new one, never a
torn file. IO shell; must not decide anything about guests (the daemon does).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

from mpqemu_mgmt.errors import NotFoundError, ServiceError
from mpqemu_mgmt.service.paths import StatePaths
from mpqemu_mgmt.service.records import GuestRecord


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that no reader ever sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)  # make the rename itself durable
    finally:
        os.close(dfd)


class StateStore:
    def __init__(self, paths: StatePaths) -> None:
        self.paths = paths

    def save(self, record: GuestRecord) -> GuestRecord:
        """Write ``record`` with its generation bumped; return what was written.

        The generation grows past whatever is on disk, so it stays monotonic even when two
        writers started from different copies (the supervisor and a request handler).
        """
        current = 0
        with contextlib.suppress(OSError, ValueError, KeyError):
            current = int(json.loads(self.paths.record(record.name).read_text())["generation"])
        record = replace(record, generation=max(record.generation, current) + 1)
        data = json.dumps(record.to_dict(), indent=1, sort_keys=True).encode() + b"\n"
        self.paths.guest_dir(record.name).mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(self.paths.record(record.name), data)
        return record

    def load(self, name: str) -> GuestRecord:
        path = self.paths.record(name)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise NotFoundError(f"no guest named {name!r}", guest=name) from exc
        except (OSError, ValueError) as exc:
            raise ServiceError(f"state file {path} is unreadable: {exc}", path=str(path)) from exc
        return GuestRecord.from_dict(raw)

    def exists(self, name: str) -> bool:
        return self.paths.record(name).is_file()

    def names(self) -> list[str]:
        if not self.paths.guests.is_dir():
            return []
        return sorted(p.name for p in self.paths.guests.iterdir() if (p / "guest.json").is_file())

    def load_all(self) -> list[GuestRecord]:
        out = []
        for name in self.names():
            with contextlib.suppress(NotFoundError):
                out.append(self.load(name))
        return out

    def delete(self, name: str) -> None:
        shutil.rmtree(self.paths.guest_dir(name), ignore_errors=True)
