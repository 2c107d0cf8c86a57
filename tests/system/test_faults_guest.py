"""Faults with a real Linux guest under a real `mpqemu-mgmt serve`: the service is SIGKILLed and
restarted while the guest runs (re-adopted, undisturbed), then a hung remote is recovered by
replug through the re-adopted guest, a hot-plug works after re-adoption, and finally the main QEMU
is SIGKILLed: the guest is marked crashed and no process of it is left.

Every replug and reset of lsi0 is checked at the guest's level: its kernel enumerates the lsi anew in
its slot, exactly once each (the count of its enumeration lines on the console goes up by one), and
the edu, never replugged, stays at its single boot-time enumeration. The guest's PCI listing alone
could not tell: it is polled every 0.2 s, a replug takes ~0.15 s, and the lsi was listed before."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from mpqemu_mgmt.guestkit.watch_guest import (
    EDU,
    LSI,
    TESTDEV,
    SlotView,
    read_console,
    read_pci_sets,
    reenumerated,
    slot_of,
    slot_view,
)
from mpqemu_mgmt.procfs import pid_alive
from tests.integration.service_fixture import Service, service

__all__ = ["service"]


def wait_bus(console: Path, want: set[str], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sets = read_pci_sets(console)
        if sets and want <= set(sets[-1].values()):
            return
        time.sleep(0.2)
    raise AssertionError(f"guest never showed {want}: {read_pci_sets(console)[-1:]}")


def view(console: Path, ids: str) -> SlotView:
    """The guest's view of ``ids`` where its latest PCI listing shows it."""
    text = read_console(console)
    bdf = slot_of(text, ids)
    assert bdf is not None, f"the guest does not list {ids}: {read_pci_sets(console)[-1:]}"
    return slot_view(text, ids, bdf)


def wait_reenumerated(console: Path, boot: SlotView, times: int, timeout: float = 30) -> None:
    """Until the guest's kernel has enumerated ``boot``'s device ``times`` more times in its slot
    than at ``boot`` (exactly: more fails) and it is listed there."""
    deadline = time.monotonic() + timeout
    while True:
        why = reenumerated(boot, slot_view(read_console(console), boot.ids, boot.bdf), times)
        if why is None:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"{why}\n{read_console(console)[-1500:]}")
        time.sleep(0.1)


def test_restart_readopt_then_hang_replug_hotplug_and_main_crash(service: Service) -> None:
    if os.geteuid() != 0:
        pytest.skip("confined remotes need root")
    from mpqemu_mgmt.cli.demo import guest_images, spec_text

    try:
        kernel, initrd = guest_images(service.root / "images")
    except Exception as exc:
        pytest.skip(f"no test guest: {exc}")
    spec = service.root / "demo.toml"
    spec.write_text(spec_text(kernel, initrd).replace('name = "demo"', 'name = "fg"'))
    service.cli("define", str(spec))
    service.cli("start", "fg")
    console = service.state / "guests" / "fg" / "console.log"
    wait_bus(console, {EDU, LSI})
    edu_boot, lsi_boot = view(console, EDU), view(console, LSI)
    # the console carries the kernel's enumeration lines (booted without quiet), one per device
    assert edu_boot.enumerations == 1 and lsi_boot.enumerations == 1, (edu_boot, lsi_boot)
    _, st, _ = service.cli("status", "fg")
    main = st["pid"]
    pids = {d["id"]: d["pid"] for d in st["devices"]}

    # 1. the service dies; the guest and its remotes do not notice
    service.kill(signal.SIGKILL)
    time.sleep(0.3)
    assert pid_alive(main) and all(pid_alive(p) for p in pids.values())
    t_restart = time.time()
    service.start()
    service.wait_event("fg", "adopted", timeout=15, after=t_restart)
    service.wait_event("fg", "healthy", "lsi0", timeout=10, after=t_restart)
    _, st, _ = service.cli("status", "fg")
    assert st["state"] == "running" and st["pid"] == main
    assert {d["id"]: d["pid"] for d in st["devices"]} == pids
    assert reenumerated(lsi_boot, view(console, LSI), times=0) is None  # re-adoption replugs nothing

    # 2. a hung remote after re-adoption: detected, killed, replugged through the adopted guest
    t0 = time.time()
    os.kill(pids["lsi0"], signal.SIGSTOP)
    hung = service.wait_event("fg", "hung", "lsi0", timeout=5, after=t0)
    print(f"\nDETECTION hung remote, re-adopted guest: {(hung['time'] - t0) * 1000:.0f} ms")
    assert hung["time"] - t0 < 2.0
    service.wait_event("fg", "replugged", "lsi0", timeout=60, after=t0)
    assert not pid_alive(pids["lsi0"])
    _, st, _ = service.cli("status", "fg")
    lsi = next(d for d in st["devices"] if d["id"] == "lsi0")
    assert lsi["pid"] != pids["lsi0"] and lsi["restarts"] == 1
    wait_reenumerated(console, lsi_boot, times=1)

    # 3. crash-loop limit: restart the service with --max-restarts 1; lsi0 already used its replug
    #    in this stable period? no: re-adoption starts a fresh count, so one more replug, then give up
    service.kill(signal.SIGTERM)
    service.args = ("--max-restarts", "1")
    t_restart = time.time()
    service.start()
    service.wait_event("fg", "healthy", "lsi0", timeout=15, after=t_restart)
    _, st, _ = service.cli("status", "fg")
    lsi_pid = next(d for d in st["devices"] if d["id"] == "lsi0")["pid"]
    os.kill(lsi_pid, signal.SIGKILL)
    service.wait_event("fg", "replugged", "lsi0", timeout=60, after=t_restart)
    service.wait_event("fg", "healthy", "lsi0", timeout=15, after=time.time() - 0.5)
    wait_reenumerated(console, lsi_boot, times=2)
    _, st, _ = service.cli("status", "fg")
    lsi_pid = next(d for d in st["devices"] if d["id"] == "lsi0")["pid"]
    os.kill(lsi_pid, signal.SIGKILL)
    service.wait_event("fg", "gave_up", "lsi0", timeout=10, after=t_restart)
    _, st, _ = service.cli("status", "fg")
    assert st["state"] == "running"  # the guest keeps running without the device
    assert next(d for d in st["devices"] if d["id"] == "lsi0")["health"] == "failed"
    # the operator's hard reset gives a failed device a fresh remote and a fresh health record
    t_reset = time.time()
    service.cli("reset", "fg", "lsi0")
    service.wait_event("fg", "healthy", "lsi0", timeout=15, after=t_reset)
    # given up: no replug (no enumeration); the reset replugs it: one more, three in all
    wait_reenumerated(console, lsi_boot, times=3)

    # 4. hot-plug after re-adoption
    service.cli("attach", "fg", "id=t1", "model=pci-testdev", "backend=builtin")
    wait_bus(console, {EDU, LSI, TESTDEV}, timeout=30)
    assert view(console, TESTDEV).enumerations == 1
    # the edu was never replugged: still its one boot-time enumeration; the lsi still three more
    assert reenumerated(edu_boot, view(console, EDU), times=0) is None
    assert reenumerated(lsi_boot, view(console, LSI), times=3) is None

    # 5. the main QEMU dies: crashed, every remote reaped, nothing orphaned
    _, st, _ = service.cli("status", "fg")
    remotes = [d["pid"] for d in st["devices"] if d["pid"] and d["health"] != "failed"]
    os.kill(main, signal.SIGKILL)
    service.wait_event("fg", "crashed", timeout=10)
    deadline = time.monotonic() + 5
    while any(pid_alive(p) for p in remotes) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pid_alive(p) for p in remotes)
    assert service.cli("status", "fg")[1]["state"] == "crashed"
    assert service.leftovers() == []
    kinds = [e["kind"] for e in service.events("fg")]
    for k in ("running", "adopted", "hung", "dead", "replugged", "gave_up", "attached", "crashed"):
        assert k in kinds
