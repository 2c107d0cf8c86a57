"""Metrics in the Prometheus text exposition format (version 0.0.4).

:func:`render` is pure (records in, text out); :func:`write_metrics` writes the opt-in file
atomically so a node-exporter textfile collector never reads half a file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
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
