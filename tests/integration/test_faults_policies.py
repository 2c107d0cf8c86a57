"""Fault injection against a real service, real main QEMUs (no guest OS) and real stock x-remote
devices: SIGSTOP and SIGKILL of a remote under each on_failure policy that needs no guest
cooperation (pause, stop, ignore), SIGKILL of the main QEMU, SIGKILL of the service and a restart.
Each test checks the events, the recorded state, and that nothing is left running. (replug needs
a guest that acknowledges the unplug: tests/system/test_faults_guest.py.)"""

from __future__ import annotations

import os
import signal
import time

import pytest

from mpqemu_mgmt.procfs import pid_alive
from tests.integration.service_fixture import Service, service, write_spec

__all__ = ["service"]


def dev(on_failure: str, dev_id: str = "t0") -> dict[str, str]:
    return {"id": dev_id, "model": "pci-testdev", "backend": "qemu", "on_failure": on_failure}


def started(svc: Service, name: str, *devices: dict[str, str]) -> dict[str, object]:
    svc.cli("define", str(write_spec(svc.root, name, *devices)))
    svc.cli("start", name)
    for d in devices:
        svc.wait_event(name, "healthy", d["id"], timeout=10)
    return svc.cli("status", name)[1]  # type: ignore[no-any-return]


def test_sigstop_remote_detected_within_2s_killed_then_pause(service: Service) -> None:
    st = started(service, "p1", dev("pause"))
    pid = st["devices"][0]["pid"]  # type: ignore[index]
    t0 = time.time()
    os.kill(pid, signal.SIGSTOP)
    hung = service.wait_event("p1", "hung", "t0", timeout=5)
    detect = hung["time"] - t0
    print(f"\nDETECTION hung remote via the service (SIGSTOP -> 'hung' event): {detect * 1000:.0f} ms")
    assert detect < 2.0
    service.wait_event("p1", "dead", "t0", timeout=5)
    paused = service.wait_event("p1", "paused", timeout=10)
    assert "t0" in (paused["device"] or "") or paused["device"] == "t0"
    assert not pid_alive(pid)  # a hung remote blocks its guest's vCPU: it must be killed
    _, st, _ = service.cli("status", "p1")
    assert st["state"] == "paused" and st["devices"][0]["health"] == "failed"
    assert pid_alive(st["pid"])  # the guest itself is kept, paused, for the operator
    # `start` ensures running: it resumes the paused guest (and is then idempotent again)
    _, res, _ = service.cli("start", "p1")
    assert res["changed"] is True and res["state"] == "running"
    service.wait_event("p1", "resumed", timeout=5)
    assert service.cli("start", "p1")[1]["changed"] is False


def test_sigkill_remote_with_on_failure_stop_stops_guest_and_reaps(service: Service) -> None:
    st = started(service, "s1", dev("stop"), dev("replug", "t1"))
    pid = st["devices"][0]["pid"]  # type: ignore[index]
    t0 = time.time()
    os.kill(pid, signal.SIGKILL)
    dead = service.wait_event("s1", "dead", "t0", timeout=5)
    ms = (dead["time"] - t0) * 1000
    print(f"\nDETECTION dead remote via the service (SIGKILL -> 'dead' event): {ms:.1f} ms")
    assert dead["time"] - t0 < 0.5  # pidfd: immediate (the event is written after fsync'd state)
    # "signal 9" when we reap it ourselves; "exited" when another waiter (subprocess) reaped it first
    assert dead["detail"] in ("process signal 9", "process exited")
    service.wait_event("s1", "stopped", timeout=15, after=t0)
    _, st, _ = service.cli("status", "s1")
    assert st["state"] == "stopped"
    time.sleep(0.2)
    assert service.leftovers() == []


def test_ignore_policy_keeps_guest_running(service: Service) -> None:
    st = started(service, "i1", dev("ignore"))
    os.kill(st["devices"][0]["pid"], signal.SIGKILL)  # type: ignore[index]
    service.wait_event("i1", "ignored", "t0", timeout=5)
    _, st, _ = service.cli("status", "i1")
    assert st["state"] == "running" and st["devices"][0]["health"] == "failed"
    assert pid_alive(st["pid"])


def test_sigkill_main_qemu_marks_crashed_and_reaps_remotes(service: Service) -> None:
    st = started(service, "c1", dev("replug"), dev("replug", "t1"))
    remotes = [d["pid"] for d in st["devices"]]  # type: ignore[attr-defined]
    os.kill(st["pid"], signal.SIGKILL)  # type: ignore[arg-type]
    service.wait_event("c1", "crashed", timeout=10)
    deadline = time.monotonic() + 5
    while any(pid_alive(p) for p in remotes) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(pid_alive(p) for p in remotes)
    _, st, _ = service.cli("status", "c1")
    assert st["state"] == "crashed" and "main QEMU" in st["reason"]
    assert all(d["pid"] is None for d in st["devices"])
    assert service.leftovers() == []
    # and the guest can be started again from there
    service.cli("start", "c1")
    assert service.cli("status", "c1")[1]["state"] == "running"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_service_killed_and_restarted_readopts_without_disturbing(service: Service, sig: int) -> None:
    st = started(service, "r1", dev("stop"))
    st2 = started(service, "r2", dev("replug"))
    before = {"r1": (st["pid"], st["devices"][0]["pid"]),  # type: ignore[index]
              "r2": (st2["pid"], st2["devices"][0]["pid"])}  # type: ignore[index]
    service.kill(sig)
    time.sleep(0.3)
    # the guests do not notice: every process is still the same process
    for main, remote in before.values():
        assert pid_alive(main) and pid_alive(remote)
    # r1's remote dies while nobody watches: the restarted service must find out and apply on_failure
    os.kill(before["r1"][1], signal.SIGKILL)
    t_restart = time.time()
    service.start()
    service.wait_event("r2", "adopted", timeout=10, after=t_restart)
    service.wait_event("r2", "healthy", "t0", timeout=10, after=t_restart)
    _, st2, _ = service.cli("status", "r2")
    assert (st2["pid"], st2["devices"][0]["pid"]) == before["r2"] and st2["state"] == "running"
    service.wait_event("r1", "dead", "t0", timeout=10, after=t_restart)
    service.wait_event("r1", "stopped", timeout=15, after=t_restart)
    assert service.cli("status", "r1")[1]["state"] == "stopped"
    assert not pid_alive(before["r1"][0])
    # the adopted guest is fully managed again: stop works and leaves nothing
    service.cli("stop", "r2", "--force")
    assert service.leftovers() == []


def test_sigstopped_main_qemu_is_reported_never_killed(service: Service) -> None:
    st = started(service, "u1", dev("replug"))
    main = st["pid"]
    service.wait_event("u1", "healthy", None, timeout=10)
    t0 = time.time()
    os.kill(main, signal.SIGSTOP)  # type: ignore[arg-type]
    try:
        ev = service.wait_event("u1", "unresponsive", timeout=5, after=t0)
        assert ev["device"] is None and ev["time"] - t0 < 2.0
        time.sleep(1.0)
        assert pid_alive(main)  # type: ignore[arg-type]  # a busy or blocked main QEMU is reported, not killed
    finally:
        t1 = time.time()  # before SIGCONT: the answer may be recorded before this process runs again
        os.kill(main, signal.SIGCONT)  # type: ignore[arg-type]
    deadline = time.monotonic() + 10
    while not any(e["kind"] == "healthy" and e["device"] is None and e["time"] >= t1
                  for e in service.events("u1")):
        assert time.monotonic() < deadline, service.events("u1")[-5:]
        time.sleep(0.05)
    assert service.cli("status", "u1")[1]["state"] == "running"
