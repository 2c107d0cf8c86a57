"""The service with the libvirt driver against the real libvirtd: start (paused, plugged through
qemuMonitorCommandWithFiles, resumed), heartbeat on the remote and on libvirt's QEMU through the
passthrough, a SIGKILLed remote under on_failure=pause pauses the domain, a SIGKILLed QEMU is a
crash with its remotes reaped, and stop/undefine leave nothing (no domain, no process)."""

from __future__ import annotations

import os
import secrets
import signal
import time

import pytest

from mpqemu_mgmt.procfs import pid_alive
from tests.integration.service_fixture import Service, service, write_spec
from tests.system.libvirt_fixture import domstate, ensure_libvirtd, virsh

__all__ = ["service"]


def test_service_with_libvirt_driver(service: Service) -> None:
    reason = ensure_libvirtd()
    if reason is not None:
        pytest.skip(reason)
    name = f"mq-svc-{secrets.token_hex(3)}"
    spec = write_spec(service.root, name,
                      {"id": "t0", "model": "pci-testdev", "backend": "qemu", "on_failure": "pause"},
                      {"id": "t1", "model": "pci-testdev", "backend": "builtin", "on_failure": "replug"},
                      extra='driver = "libvirt"\nuri = "qemu:///system"\n')
    try:
        service.cli("define", str(spec))
        service.cli("start", name)
        assert domstate(name) == "running"
        service.wait_event(name, "healthy", "t0", timeout=15)
        # libvirt's QEMU answers query-status through the passthrough (the event has no device)
        deadline = time.monotonic() + 15
        while not any(e["kind"] == "healthy" and e["device"] is None for e in service.events(name)):
            assert time.monotonic() < deadline, service.events(name)
            time.sleep(0.05)
        _, st, _ = service.cli("status", name)
        assert st["driver"] == "libvirt" and st["pid"] and all(d["pid"] for d in st["devices"])

        os.kill(st["devices"][0]["pid"], signal.SIGKILL)
        service.wait_event(name, "paused", timeout=15)
        assert domstate(name) == "paused"
        assert service.cli("status", name)[1]["state"] == "paused"

        remotes = [d["pid"] for d in st["devices"]]
        os.kill(st["pid"], signal.SIGKILL)
        service.wait_event(name, "crashed", timeout=15)
        deadline = time.monotonic() + 5
        while any(pid_alive(p) for p in remotes) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(pid_alive(p) for p in remotes)

        service.cli("start", name)
        assert domstate(name) == "running"
        service.cli("stop", name, "--force")
        assert domstate(name) in ("shut off", "absent")
        service.cli("undefine", name)
        assert domstate(name) == "absent"
        assert service.leftovers() == []
    finally:
        virsh("destroy", name, timeout=30)
        virsh("undefine", name, timeout=30)
