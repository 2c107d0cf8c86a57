"""Replug under the libvirt driver with a real Linux guest (TCG), through a real ``mpqemu-mgmt serve``.

The PCI-watching guest (guestkit/watch_guest.py) boots under libvirtd with one builtin edu remote
(``on_failure = "replug"``). The remote is SIGKILLed: the service detects it (``dead``, pidfd),
unplugs the dead proxy through libvirt's QMP passthrough (the guest acknowledges the ACPI eject),
starts a fresh confined remote and plugs it (getfd through qemuMonitorCommandWithFiles, device_add);
the guest's kernel enumerates the edu anew in its slot, exactly once (its console log, without
``quiet``; guestkit/watch_guest.py counts the lines), its PCI listing shows it, and the fresh remote
answers the heartbeat. Stopping the guest leaves no process of it behind.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from mpqemu_mgmt.guestkit.watch_guest import (
    EDU,
    parse_enumerations,
    read_console,
    read_pci_sets,
    reenumerated,
    slot_of,
    slot_view,
)
from mpqemu_mgmt.procfs import pid_alive
from tests.integration.service_fixture import Service, service
from tests.system.libvirt_fixture import domstate, edu_watch_guest, ensure_libvirtd, virsh

__all__ = ["service"]


def enumerations(console: Path) -> int:
    """How often the guest's kernel enumerated an edu, in any slot (watch_guest.parse_enumerations):
    at boot and on each ACPI hot-add. The watcher's own listings cannot tell a quick replug: it polls
    every 0.2 s and a replug takes about 0.15 s. (test_hook_live uses this too.)"""
    return sum(1 for e in parse_enumerations(read_console(console)) if e.ids == EDU)


def wait_sets(console: Path, done: object, timeout: float, what: str) -> list[dict[str, str]]:
    """Poll the guest's PCI listings until ``done(sets)`` holds."""
    deadline = time.monotonic() + timeout
    sets: list[dict[str, str]] = []
    while time.monotonic() < deadline:
        sets = read_pci_sets(console)
        if done(sets):  # type: ignore[operator]
            return sets
        time.sleep(0.1)
    raise AssertionError(f"the guest never showed {what}; last listings: {sets[-3:]}")


def test_replug_under_libvirt_with_a_real_guest(service: Service) -> None:
    if os.geteuid() != 0:
        pytest.skip("confined remotes and qemu:///system need root")
    reason = ensure_libvirtd()
    if reason is not None:
        pytest.skip(reason)
    name, spec, console = edu_watch_guest(service, "mq-rpl", "REPLUG-READY")
    try:
        service.cli("define", str(spec))
        service.cli("start", name)
        assert domstate(name) == "running"
        wait_sets(console, lambda s: bool(s) and EDU in s[-1].values(), 90, "the edu at boot")
        _, st, _ = service.cli("status", name)
        assert st["driver"] == "libvirt"
        main, old = st["pid"], st["devices"][0]["pid"]
        service.wait_event(name, "healthy", "edu0", timeout=15)

        # SIGKILL the remote: detected, replugged with a fresh confined remote
        text = read_console(console)
        slot = slot_of(text, EDU)
        assert slot is not None
        before = slot_view(text, EDU, slot)
        assert before.enumerations == 1 and enumerations(console) == 1
        t0 = time.time()
        os.kill(old, signal.SIGKILL)
        dead = service.wait_event(name, "dead", "edu0", timeout=5, after=t0)
        replugged = service.wait_event(name, "replugged", "edu0", timeout=60, after=t0)
        print(f"\nREPLUG (libvirt driver, real guest): dead detected in {(dead['time'] - t0) * 1000:.0f} ms, "
              f"replugged after {replugged['time'] - t0:.1f} s")
        assert dead["time"] - t0 < 1.0
        assert not pid_alive(old)
        _, st, _ = service.cli("status", name)
        dev = st["devices"][0]
        assert dev["pid"] and dev["pid"] != old and pid_alive(dev["pid"]) and dev["restarts"] == 1
        conf = dev["confinement"]
        assert conf.get("seccomp") and conf.get("namespaces") and conf.get("uid") not in (None, 0), conf
        assert st["pid"] == main and pid_alive(main) and domstate(name) == "running"
        service.wait_event(name, "healthy", "edu0", timeout=15, after=replugged["time"])

        # the guest saw the edu come back: its kernel enumerated it anew in its slot, exactly once
        # (it cannot while the old one is still there), and its PCI listing shows it there
        wait_sets(console, lambda _sets: reenumerated(before, slot_view(read_console(console), EDU, slot))
                  is None, 30, f"its kernel enumerate the edu again at {slot}, once")

        # stop: nothing of the guest is left
        service.cli("stop", name, "--force")
        assert domstate(name) == "shut off"
        assert not pid_alive(main) and not pid_alive(dev["pid"])
        assert service.leftovers() == []
        kinds = [e["kind"] for e in service.events(name)]
        for kind in ("running", "dead", "replugged", "healthy", "stopped"):
            assert kind in kinds, kinds
    finally:
        service.cli("stop", name, "--force", check=False, timeout=60)
        virsh("destroy", name, timeout=30)
        virsh("undefine", name, timeout=30)
