"""The service's files and control socket, for real: atomic store, event/audit logs, follow,
a control server on a 0600 UNIX socket that sees the caller's uid through SO_PEERCRED."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mpqemu_mgmt.errors import NotFoundError, ServiceError
from mpqemu_mgmt.service.audit import AuditLog, read_audit
from mpqemu_mgmt.service.control import ControlServer, Peer, Progress, call
from mpqemu_mgmt.service.events import EventLog, follow_events, read_events
from mpqemu_mgmt.service.paths import StatePaths
from mpqemu_mgmt.service.records import GuestRecord
from mpqemu_mgmt.service.store import StateStore, atomic_write


def test_store_save_load_generation_and_no_temp_files(tmp_path: Path) -> None:
    store = StateStore(StatePaths(tmp_path, tmp_path))
    rec = store.save(GuestRecord("demo", {"name": "demo"}))
    assert rec.generation == 1
    rec = store.save(rec)
    assert store.load("demo").generation == 2
    assert store.names() == ["demo"]
    assert [p.name for p in store.paths.guest_dir("demo").iterdir()] == ["guest.json"]
    assert stat.S_IMODE(store.paths.record("demo").stat().st_mode) == 0o600
    with pytest.raises(NotFoundError):
        store.load("nope")
    store.delete("demo")
    assert store.names() == []


def test_atomic_write_readers_never_see_partial_files(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    big = [b"a" * 200_000, b"b" * 200_000]
    atomic_write(path, big[0])
    stop = threading.Event()
    seen: set[bytes] = set()

    def reader() -> None:
        while not stop.is_set():
            data = path.read_bytes()
            seen.add(data[:1] + bytes([len(data) == 200_000]))

    t = threading.Thread(target=reader)
    t.start()
    for i in range(40):
        atomic_write(path, big[i % 2])
    stop.set()
    t.join()
    assert seen <= {b"a\x01", b"b\x01"}


def test_event_log_append_read_and_follow(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl")
    log.emit("defined", "g1")
    log.emit("dead", "g1", "edu0", "process signal 9", pid=7)
    log.emit("defined", "g2")
    with (tmp_path / "events.jsonl").open("a") as f:
        f.write('{"torn')  # a crash mid-line must not break readers ...
    log = EventLog(tmp_path / "events.jsonl")  # ... nor the restarted writer
    assert [e.kind for e in read_events(log.path, "g1")] == ["defined", "dead"]
    assert read_events(log.path, "g1")[1].data == {"pid": 7}
    got: list[str] = []
    deadline = time.monotonic() + 5

    def writer() -> None:
        time.sleep(0.2)
        log.emit("healthy", "g1", "edu0")

    threading.Thread(target=writer).start()
    for ev in follow_events(log.path, "g1", poll=0.02, stop=lambda: time.monotonic() > deadline):
        got.append(ev.kind)
        if ev.kind == "healthy":
            break
    assert got == ["defined", "dead", "healthy"]


def test_audit_log(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    e = audit.begin("attach", {"name": "g"}, uid=0, pid=123)
    e.calls.append("qmp getfd")
    e.result = "error"
    e.error = "boom"
    audit.write(e)
    (entry,) = read_audit(audit.path)
    assert entry["command"] == "attach" and entry["uid"] == 0 and entry["calls"] == ["qmp getfd"]
    assert entry["result"] == "error" and entry["time"] > 0


def test_control_socket_mode_peer_progress_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    peers: list[Peer] = []

    async def handler(command: str, args: dict[str, Any], peer: Peer, progress: Progress) -> Any:
        peers.append(peer)
        if command == "boom":
            raise NotFoundError("no guest named 'x'", guest="x")
        if command == "bug":
            raise RuntimeError("oops")
        await progress("half way")
        return {"echo": args}

    ready = threading.Event()
    done = threading.Event()

    def serve() -> None:
        async def main() -> None:
            server = ControlServer(path, handler)
            await server.start()
            ready.set()
            while not done.is_set():
                await asyncio.sleep(0.01)
            await server.close()
        asyncio.run(main())

    t = threading.Thread(target=serve)
    t.start()
    try:
        assert ready.wait(5)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        prog: list[str] = []
        assert call(path, "echo", {"a": 1}, on_progress=prog.append) == {"echo": {"a": 1}}
        assert prog == ["half way"]
        assert peers[0] == Peer(uid=os.geteuid(), pid=os.getpid())
        with pytest.raises(NotFoundError) as ei:
            call(path, "boom")
        assert ei.value.details == {"guest": "x"}
        with pytest.raises(Exception, match="internal error"):
            call(path, "bug")
    finally:
        done.set()
        t.join(5)
    assert not path.exists()
    with pytest.raises(ServiceError, match="not running"):
        call(path, "echo")
