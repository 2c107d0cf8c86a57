"""Metrics in the Prometheus text exposition format (version 0.0.4).

:func:`render` is pure (records in, text out); :func:`write_metrics` writes the opt-in file
atomically so a node-exporter textfile collector never reads half a file; :class:`MetricsEndpoint`
is the opt-in HTTP endpoint. Must not decide anything about the guests.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from mpqemu_mgmt.service.records import GuestRecord
from mpqemu_mgmt.service.store import atomic_write

HEALTH_STATES = ("starting", "healthy", "unresponsive", "hung", "dead", "backoff", "failed", "stopped")


def _label(value: str) -> str:
    # Label values escape backslash, double quote and newline (exposition format spec).
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(guests: Iterable[GuestRecord], latencies: Mapping[tuple[str, str], float]) -> str:
    """``latencies`` maps (guest, device id or "main") to the last query-status round trip."""
    lines = [
        "# HELP mpqemu_guest_running 1 when the guest's main QEMU is running.",
        "# TYPE mpqemu_guest_running gauge",
    ]
    guests = list(guests)
    for g in guests:
        lines.append(f'mpqemu_guest_running{{guest="{_label(g.name)}"}} {int(g.state == "running")}')
    lines += ["# HELP mpqemu_device_health 1 for the device's current health state.",
              "# TYPE mpqemu_device_health gauge"]
    for g in guests:
        for d in g.devices:
            for st in HEALTH_STATES:
                lines.append(f'mpqemu_device_health{{guest="{_label(g.name)}",device="{_label(d.id)}",'
                             f'state="{st}"}} {int(d.health == st)}')
    lines += ["# HELP mpqemu_device_restarts_total Replugs of the device's remote process.",
              "# TYPE mpqemu_device_restarts_total counter"]
    for g in guests:
        for d in g.devices:
            lines.append(f'mpqemu_device_restarts_total{{guest="{_label(g.name)}",device="{_label(d.id)}"}} '
                         f"{d.restarts}")
    lines += ["# HELP mpqemu_heartbeat_latency_seconds Last query-status round trip.",
              "# TYPE mpqemu_heartbeat_latency_seconds gauge"]
    for (guest, proc), secs in sorted(latencies.items()):
        lines.append(f'mpqemu_heartbeat_latency_seconds{{guest="{_label(guest)}",process="{_label(proc)}"}} '
                     f"{secs:.6f}")
    return "\n".join(lines) + "\n"


def write_metrics(path: Path, text: str) -> None:
    atomic_write(path, text.encode(), mode=0o644)


class MetricsEndpoint:
    """Opt-in ``GET /metrics`` over HTTP/1.0 for a Prometheus scraper (``serve --metrics-listen``).

    Deliberately minimal: one request per connection, only GET /metrics, no keep-alive, read-only;
    bind it to localhost unless a firewall stands in front of it.
    """

    def __init__(self, host: str, port: int, text: Callable[[], str]) -> None:
        self.host = host
        self.port = port
        self._text = text
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5.0)
            with contextlib.suppress(Exception):  # drain the headers we do not need
                while (await asyncio.wait_for(reader.readline(), 1.0)) not in (b"\r\n", b"\n", b""):
                    pass
            parts = request.decode("latin-1").split()
            if len(parts) >= 2 and parts[0] == "GET" and parts[1].split("?")[0] == "/metrics":
                body = self._text().encode()
                head = (f"HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n").encode()
            else:
                body = b"not found\n"
                head = f"HTTP/1.0 404 Not Found\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            writer.write(head + body)
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
