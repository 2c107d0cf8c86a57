"""The remote's own QMP monitor: enough of QEMU's QMP for the service to heartbeat it with qemu.qmp.

What it is: a small, non-blocking QMP server over a listening AF_UNIX socket that it was *given*
(``--qmp-fd``: the manager bound it; or ``--qmp PATH`` for development, bound by ``__main__``
before confinement). It serves one client at a time; a second connection waits in the backlog
until the first one leaves. Protocol as QEMU's monitor/qmp.c: a greeting
``{"QMP": {"version": ..., "capabilities": []}}``, then only ``qmp_capabilities`` is accepted
until negotiation; replies echo ``id``; errors are ``{"error": {"class", "desc"}}``.

Commands: ``qmp_capabilities``, ``query-status``, ``query-version``, ``query-commands``, ``quit``
and ``x-device-status`` (the device model's state, from the serve loop).

What it must not do: create sockets or paths (it only accepts on the fd it holds), block the
device loop (every socket is non-blocking; output that cannot be written at once drops the
client), or keep more than :data:`MAX_INPUT` bytes of unparsed input.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable
from typing import Any

MAX_INPUT = 64 * 1024
QEMU_VERSION = {"major": 7, "minor": 2, "micro": 0}
PACKAGE = "mpqemu-mgmt remote"

Handler = Callable[[dict[str, Any]], Any]


def _value_end(data: bytes) -> int | None:
    """End offset of the first complete top-level JSON value in ``data``, None if incomplete.

    Like QEMU's JSON streamer (qobject/json-streamer.c), it only tracks nesting and strings: an
    object or array ends where its depth returns to zero; anything else (a stray scalar, garbage)
    ends at the next newline and is then reported as a parse error.
    """
    if data[:1] not in (b"{", b"["):
        nl = data.find(b"\n")
        return None if nl < 0 else nl + 1
    depth = 0
    in_string = escaped = False
    for i, c in enumerate(data):
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:  # backslash
                escaped = True
            elif c == 0x22:  # quote
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c in (0x7B, 0x5B):  # { [
            depth += 1
        elif c in (0x7D, 0x5D):  # } ]
            depth -= 1
            if depth == 0:
                return i + 1
    return None


class QmpError(Exception):
    """A QMP error reply (class and description), not an MpqemuError: it never leaves this module."""

    def __init__(self, cls: str, desc: str) -> None:
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


class QmpServer:
    def __init__(
        self,
        listener: socket.socket,
        status: Callable[[], dict[str, Any]],
        log: Callable[[str], None] | None = None,
    ) -> None:
        listener.setblocking(False)
        self.listener = listener
        self.client: socket.socket | None = None
        self._buf = b""
        self._negotiated = False
        self._status = status
        self._log = log or (lambda _m: None)
        self.quit_requested = False
        self.commands: dict[str, Handler] = {
            "qmp_capabilities": self._qmp_capabilities,
            "query-status": lambda _a: {"status": "running", "singlestep": False, "running": True},
            "query-version": lambda _a: {"qemu": dict(QEMU_VERSION), "package": PACKAGE},
            "query-commands": lambda _a: [{"name": n} for n in sorted(self.commands)],
            "quit": self._quit,
            "x-device-status": lambda _a: self._status(),
        }

    # -- loop integration ----------------------------------------------------------------------

    def filenos(self) -> list[int]:
        """The fds to poll: the client if one is connected, else the listener."""
        return [self.client.fileno()] if self.client is not None else [self.listener.fileno()]

    def on_readable(self, fd: int) -> None:
        if self.client is None:
            self._accept()
        elif fd == self.client.fileno():
            self._read()

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._log(f"QMP accept failed: {exc}")
            return
        conn.setblocking(False)
        self.client = conn
        self._buf = b""
        self._negotiated = False
        self._send({"QMP": {"version": {"qemu": dict(QEMU_VERSION), "package": PACKAGE}, "capabilities": []}})

    def _drop(self) -> None:
        if self.client is not None:
            with contextlib.suppress(OSError):
                self.client.close()
        self.client = None
        self._buf = b""

    def _read(self) -> None:
        assert self.client is not None
        try:
            data = self.client.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop()
            return
        self._buf += data
        if len(self._buf) > MAX_INPUT:
            self._log("QMP client sent too much unparsed input; dropped")
            self._drop()
            return
        self._parse()

    def _parse(self) -> None:
        while self.client is not None:
            text = self._buf.lstrip()
            if not text:
                self._buf = b""
                return
            end = _value_end(text)
            if end is None:
                self._buf = text
                return  # incomplete: wait for more input
            chunk, self._buf = text[:end], text[end:]
            try:
                obj = json.loads(chunk)
            except (ValueError, UnicodeDecodeError):
                self._send({"error": {"class": "GenericError", "desc": "JSON parse error"}})
                continue
            self._dispatch(obj)

    def _dispatch(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            self._send({"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}})
            return
        reply: dict[str, Any]
        try:
            name = obj.get("execute")
            if not isinstance(name, str):
                raise QmpError("GenericError", "QMP input lacks member 'execute'")
            args = obj.get("arguments", {})
            if not isinstance(args, dict):
                raise QmpError("GenericError", "QMP input member 'arguments' must be an object")
            if not self._negotiated and name != "qmp_capabilities":
                raise QmpError(
                    "CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'"
                )
            handler = self.commands.get(name)
            if handler is None:
                raise QmpError("CommandNotFound", f"The command {name} has not been found")
            reply = {"return": handler(args)}
        except QmpError as exc:
            reply = {"error": {"class": exc.cls, "desc": exc.desc}}
        if "id" in obj:
            reply["id"] = obj["id"]
        self._send(reply)

    def _qmp_capabilities(self, args: dict[str, Any]) -> dict[str, Any]:
        if self._negotiated:
            raise QmpError("CommandNotFound", "Capabilities negotiation is already complete, command ignored")
        if args.get("enable"):
            raise QmpError("GenericError", "Capability 'oob' not available")
        self._negotiated = True
        return {}

    def _quit(self, _args: dict[str, Any]) -> dict[str, Any]:
        self.quit_requested = True
        return {}

    def _send(self, obj: dict[str, Any]) -> None:
        if self.client is None:
            return
        data = (json.dumps(obj) + "\r\n").encode()
        try:
            sent = self.client.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._drop()
            return
        if sent != len(data):
            # A client that does not read its replies cannot stall the device loop.
            self._log("QMP client is not reading; dropped")
            self._drop()

    def announce_shutdown(self) -> None:
        """The SHUTDOWN event QEMU emits on ``quit`` (best effort)."""
        now = time.time()
        stamp = {"seconds": int(now), "microseconds": int(now % 1 * 1e6)}
        self._send(
            {"event": "SHUTDOWN", "data": {"guest": False, "reason": "host-qmp-quit"}, "timestamp": stamp}
        )

    def close(self) -> None:
        self._drop()
        with contextlib.suppress(OSError):
            self.listener.close()
