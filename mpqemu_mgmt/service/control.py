"""The control API: JSON lines over a UNIX socket (mode 0600) between the CLI and the service.

Wire form, one JSON object per line:

* request   ``{"id": 1, "command": "start", "args": {"name": "demo"}}``
* progress  ``{"id": 1, "progress": "remote edu0 up (pid 1234)"}``  (zero or more)
* response  ``{"id": 1, "ok": true, "result": {...}}`` or
  ``{"id": 1, "ok": false, "error": {"error": "NotFoundError", "message": ..., ...}}``

The peer's uid and pid come from SO_PEERCRED (unix(7)), for the audit log and for refusing
anyone but root and the service's own user. :func:`encode`/:func:`decode` and :func:`error_from`
are pure; :class:`ControlServer` and :func:`call` are the IO shell. Must not know any command.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpqemu_mgmt import errors
from mpqemu_mgmt.errors import MpqemuError, ServiceError, UsageError

MAX_LINE = 1 << 20


def encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, default=str).encode() + b"\n"


def decode(line: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except ValueError as exc:
        raise UsageError(f"control API: not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise UsageError("control API: a message must be a JSON object")
    return obj


def error_from(payload: dict[str, Any]) -> MpqemuError:
    """Rebuild the service's error on the client side, so the CLI exits with the same code."""
    name = str(payload.get("error", "MpqemuError"))
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, MpqemuError)):
        cls = MpqemuError
    details = {k: v for k, v in payload.items() if k not in ("error", "message", "exit_code")}
    return cls(str(payload.get("message", "the service reported an error")), **details)


@dataclass(frozen=True)
class Peer:
    uid: int | None
    pid: int | None


Progress = Callable[[str], Awaitable[None]]
Handler = Callable[[str, dict[str, Any], Peer, Progress], Awaitable[Any]]


def peer_of(sock: socket.socket) -> Peer:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return Peer(None, None)
    pid, uid, _gid = struct.unpack("3i", raw)
    return Peer(uid=uid, pid=pid)


class ControlServer:
    """Serves the control socket; each request runs ``handler`` and answers with its result."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is born 0600: no window where others may connect
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self._server = await asyncio.start_unix_server(self._client, sock=sock, limit=MAX_LINE)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        peer = peer_of(writer.get_extra_info("socket"))
        try:
            while line := await reader.readline():
                await self._one(line, peer, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _one(self, line: bytes, peer: Peer, writer: asyncio.StreamWriter) -> None:
        req_id: Any = None
        try:
            req = decode(line)
            req_id = req.get("id")
            if peer.uid not in (0, os.geteuid()):
                raise errors.RefusedError(f"uid {peer.uid} may not use this service", uid=peer.uid)
            command = req.get("command")
            args = req.get("args") or {}
            if not isinstance(command, str) or not isinstance(args, dict):
                raise UsageError("control API: 'command' must be a string and 'args' an object")

            async def progress(text: str) -> None:
                writer.write(encode({"id": req_id, "progress": text}))
                with contextlib.suppress(ConnectionError):
                    await writer.drain()

            result = await self.handler(command, args, peer, progress)
            writer.write(encode({"id": req_id, "ok": True, "result": result}))
        except MpqemuError as exc:
            writer.write(encode({"id": req_id, "ok": False,
                                 "error": {**exc.to_dict(), "exit_code": exc.exit_code}}))
        except Exception as exc:  # a bug in a handler must not kill the service
            writer.write(encode({"id": req_id, "ok": False, "error": {
                "error": "MpqemuError", "message": f"internal error: {exc!r}", "exit_code": 1}}))
        await writer.drain()


def call(path: Path, command: str, args: dict[str, Any] | None = None, timeout: float = 120.0,
         on_progress: Callable[[str], None] | None = None) -> Any:
    """One request from a (blocking) client; returns the result or raises the service's error."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise ServiceError(f"the service is not running (no socket at {path}); "
                               "start it with `mpqemu-mgmt serve`", socket=str(path)) from exc
        except PermissionError as exc:
            raise ServiceError(f"no permission to use {path} (run as root)", socket=str(path)) from exc
        sock.sendall(encode({"id": 1, "command": command, "args": args or {}}))
        f = sock.makefile("rb")
        while True:
            try:
                line = f.readline(MAX_LINE)
            except TimeoutError as exc:
                raise ServiceError(f"the service did not answer {command!r} within {timeout:.0f}s",
                                   command=command) from exc
            if not line:
                raise ServiceError(f"the service closed the connection during {command!r}", command=command)
            msg = decode(line)
            if "progress" in msg:
                if on_progress is not None:
                    on_progress(str(msg["progress"]))
                continue
            if msg.get("ok"):
                return msg.get("result")
            raise error_from(dict(msg.get("error") or {}))
    finally:
        sock.close()
