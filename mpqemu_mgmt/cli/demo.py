"""``mpqemu-mgmt demo``: the guided tour, with its own service instance in a scratch state directory.

It boots the test guest (Debian's cloud kernel, a busybox initramfs that prints the guest's PCI bus
whenever it changes) with our edu and a stock QEMU lsi53c895a, both confined; shows what the guest
sees; hot-plugs our pci-testdev; SIGKILLs one remote and SIGSTOPs the other and shows the
detection and the replug, proven at the guest's level by its kernel enumerating the device anew in
its slot (exactly once per replug; see guestkit/watch_guest.py); stops cleanly and checks that no
process is left; then prints a summary with the timings. Everything
goes through the same Daemon handlers the control API serves. Must not reach into the driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpqemu_mgmt.errors import MpqemuError, ProcessFailed
from mpqemu_mgmt.guestkit.watch_guest import (
    EDU,
    LSI,
    TESTDEV,
    SlotView,
    place_images,
    read_console,
    read_pci_sets,
    reenumerated,
    slot_of,
    slot_view,
    watch_images,
    watch_spec_toml,
)
from mpqemu_mgmt.procfs import pid_alive

NAMES = {
    EDU: "edu (ours, builtin remote)",
    LSI: "lsi53c895a (stock QEMU x-remote)",
    TESTDEV: "pci-testdev (ours, hot-plugged)",
    "0x8086:0x1237": "i440FX host bridge",
    "0x8086:0x7000": "PIIX3 ISA bridge",
    "0x8086:0x7010": "PIIX3 IDE",
    "0x8086:0x7113": "PIIX4 ACPI",
}


@dataclass
class Summary:
    steps: list[tuple[str, float, str]] = field(default_factory=list)
    figures: dict[str, str] = field(default_factory=dict)
    ok: bool = True


async def wait_bus(console: Path, want: set[str], gone: set[str], timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    last: dict[str, str] = {}
    while time.monotonic() < deadline:
        sets = read_pci_sets(console)
        if sets:
            last = sets[-1]
            ids = set(last.values())
            if want <= ids and not (gone & ids):
                return last
        await asyncio.sleep(0.2)
    raise ProcessFailed(f"the guest did not show {sorted(want)} (without {sorted(gone)}) "
                        f"within {timeout:.0f}s", last=last)


async def wait_reenumerated(console: Path, before: SlotView, timeout: float) -> SlotView:
    """Until the guest's kernel has enumerated ``before``'s device once more in its slot and the
    guest lists it there; the bus listing alone cannot tell (see guestkit/watch_guest.py)."""
    deadline = time.monotonic() + timeout
    while True:
        now = slot_view(read_console(console), before.ids, before.bdf)
        why = reenumerated(before, now)
        if why is None:
            return now
        if time.monotonic() >= deadline:
            raise ProcessFailed(f"the replug of {before.name} was not seen by the guest within "
                                f"{timeout:.0f}s: {why}", enumerations=now.enumerations)
        await asyncio.sleep(0.1)


def device_view(console: Path, ids: str) -> SlotView:
    """The guest's view of ``ids`` where its latest PCI listing shows it."""
    text = read_console(console)
    bdf = slot_of(text, ids)
    if bdf is None:
        raise ProcessFailed(f"the guest does not list {ids}")
    return slot_view(text, ids, bdf)


def guest_images(into: Path) -> tuple[Path, Path]:
    """The demo's watching guest (its console starts with DEMO-READY), placed in ``into``."""
    return place_images(into, watch_images(ready="DEMO-READY"))


def spec_text(kernel: Path, initrd: Path) -> str:
    """The demo guest's spec: our edu and QEMU's lsi53c895a, both replugged on failure."""
    devices = [("edu0", "edu", "builtin"), ("lsi0", "lsi53c895a", "qemu")]
    return watch_spec_toml("demo", kernel, initrd, devices)


def _bus_lines(bus: dict[str, str], highlight: set[str]) -> list[str]:
    lines = []
    for bdf, vd in sorted(bus.items()):
        mark = "»" if vd in highlight else " "
        lines.append(f"   {mark} {bdf}  {vd}  {NAMES.get(vd, '')}")
    return lines


async def _demo(out: Callable[[str], None], root: Path, summary: Summary) -> None:
    from mpqemu_mgmt.domain.spec import parse_spec
    from mpqemu_mgmt.orchestrate.heartbeat import Settings
    from mpqemu_mgmt.service.control import Peer
    from mpqemu_mgmt.service.daemon import Daemon
    from mpqemu_mgmt.service.events import Event
    from mpqemu_mgmt.service.paths import StatePaths

    t_all = time.monotonic()
    paths = StatePaths(root / "state", root / "state")
    daemon = Daemon(paths, Settings())
    seen: list[tuple[float, Event]] = []
    daemon.events.listeners.append(lambda ev: seen.append((time.monotonic(), ev)))
    peer = Peer(os.geteuid(), os.getpid())

    async def call(command: str, **args: Any) -> Any:
        async def progress(text: str) -> None:
            out(f"   … {text}")
        return await daemon.handle(command, args, peer, progress)

    def step(title: str, t0: float, note: str = "") -> None:
        dt = time.monotonic() - t0
        summary.steps.append((title, dt, note))
        out(f"   ✓ {title} ({dt:.1f} s){' — ' + note if note else ''}")

    await daemon.open(serve=True)
    try:
        out("1. Test guest: Debian cloud kernel + busybox initramfs (cached after the first run)")
        t0 = time.monotonic()
        kernel, initrd = await asyncio.to_thread(guest_images, root / "images")
        step("guest images ready", t0)

        out("2. Define and start the guest: main QEMU paused, two confined remotes plugged, then run")
        spec = parse_spec(spec_text(kernel, initrd), "demo.toml")
        await call("define", spec=spec.to_dict(), source="demo.toml")
        t0 = time.monotonic()
        await call("start", name="demo")
        status = await call("status", name="demo")
        step("guest running", t0, f"main QEMU pid {status['pid']}")
        for d in status["devices"]:
            c = d["confinement"]
            out(f"     {d['id']:<6} {d['model']:<12} {d['backend']:<8} pid {d['pid']:<7} uid {c.get('uid')} "
                f"seccomp {c.get('seccomp')} namespaces {','.join(c.get('namespaces') or []) or '-'}")

        out("3. What the guest sees on its PCI bus (read from its serial console)")
        console = Path(status.get("console") or paths.guest_dir("demo") / "console.log")
        t0 = time.monotonic()
        bus = await wait_bus(console, {EDU, LSI}, set(), 90)
        step("guest booted and listed its bus", t0)
        if device_view(console, EDU).enumerations != 1:
            # without the boot-time line no replug could be proven either (``quiet``?)
            raise ProcessFailed("the guest's console does not show its kernel enumerating the edu once")
        for line in _bus_lines(bus, {EDU, LSI}):
            out(line)

        out("4. Hot-plug our pci-testdev (attach demo id=t1 model=pci-testdev backend=builtin)")
        t0 = time.monotonic()
        res = await call("attach", name="demo", device={"id": "t1", "model": "pci-testdev",
                                                        "backend": "builtin"})
        bus = await wait_bus(console, {EDU, LSI, TESTDEV}, set(), 60)
        step("guest sees the new device", t0, f"remote pid {res['pid']}")
        for line in _bus_lines(bus, {TESTDEV}):
            out(line)

        out("5. SIGKILL the edu remote: the supervisor sees it die, then replugs a fresh confined remote")
        status = await call("status", name="demo")
        victim = next(d for d in status["devices"] if d["id"] == "edu0")
        mark = len(seen)
        edu_before = device_view(console, EDU)
        t_kill = time.monotonic()
        os.kill(int(victim["pid"]), signal.SIGKILL)
        out(f"     kill -9 {victim['pid']}")

        async def event(kind: str, device: str, timeout: float) -> float:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                for t, ev in seen[mark:]:
                    if ev.kind == kind and ev.device == device:
                        return t
                await asyncio.sleep(0.005)
            raise ProcessFailed(f"no {kind!r} event for {device} within {timeout:.0f}s")

        t_dead = await event("dead", "edu0", 5)
        detect_ms = (t_dead - t_kill) * 1000
        out(f"     detected dead after {detect_ms:.1f} ms (pidfd)")
        t_replugged = await event("replugged", "edu0", 60)
        t_healthy = await event("healthy", "edu0", 10)
        status = await call("status", name="demo")
        fresh = next(d for d in status["devices"] if d["id"] == "edu0")
        edu_now = await wait_reenumerated(console, edu_before, 30)
        out(f"     guest re-enumerated {edu_before.name}: its kernel's enumeration lines for that slot "
            f"went {edu_before.enumerations} → {edu_now.enumerations}")
        step("edu0 replugged and healthy", t_kill,
             f"guest re-enumerated {edu_before.name}; new pid {fresh['pid']}")
        summary.figures["dead remote detected (SIGKILL → event)"] = f"{detect_ms:.1f} ms"
        summary.figures["replug done (unplug acked, fresh remote, plug)"] = f"{t_replugged - t_kill:.1f} s"
        summary.figures["replugged remote answers query-status"] = f"{t_healthy - t_kill:.1f} s"
        for _t, ev in seen[mark:]:
            if ev.device == "edu0":
                out(f"     event {ev.kind:<17} {ev.detail}")

        out("6. SIGSTOP the stock lsi0 remote: alive but hung; query-status times out, it is killed "
            "and replugged")
        mark = len(seen)
        lsi = next(d for d in status["devices"] if d["id"] == "lsi0")
        lsi_before = device_view(console, LSI)
        t_stop = time.monotonic()
        os.kill(int(lsi["pid"]), signal.SIGSTOP)
        out(f"     kill -STOP {lsi['pid']}   (heartbeat: query-status every 0.5 s, 1 s timeout)")
        t_hung = await event("hung", "lsi0", 5)
        hung_ms = (t_hung - t_stop) * 1000
        out(f"     detected hung after {hung_ms:.0f} ms; killed (a hung remote blocks the vCPU touching it)")
        await event("replugged", "lsi0", 60)
        await event("healthy", "lsi0", 10)
        status = await call("status", name="demo")
        fresh = next(d for d in status["devices"] if d["id"] == "lsi0")
        lsi_now = await wait_reenumerated(console, lsi_before, 30)
        out(f"     guest re-enumerated {lsi_before.name}: its kernel's enumeration lines for that slot "
            f"went {lsi_before.enumerations} → {lsi_now.enumerations}")
        # and the edu's replug stays a single enumeration
        why = reenumerated(edu_before, slot_view(read_console(console), EDU, edu_before.bdf))
        if why is not None:
            raise ProcessFailed(f"after the lsi0 replug: {why}")
        step("lsi0 replugged and healthy", t_stop,
             f"guest re-enumerated {lsi_before.name}; new pid {fresh['pid']}")
        summary.figures["hung remote detected (SIGSTOP → event)"] = f"{hung_ms:.0f} ms"
        for _t, ev in seen[mark:]:
            if ev.device == "lsi0":
                out(f"     event {ev.kind:<17} {ev.detail}")

        out("7. Stop the guest (--force: the busybox guest runs no ACPI daemon to act on a powerdown);")
        out("   nothing may be left running")
        pids = [status["pid"], *(d["pid"] for d in status["devices"] if d["pid"])]
        t0 = time.monotonic()
        await call("stop", name="demo", force=True)
        deadline = time.monotonic() + 5
        while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = [p for p in pids if pid_alive(p)]
        if left:
            summary.ok = False
            raise ProcessFailed(f"processes left after stop: {left}", pids=left)
        step("guest stopped", t0, f"{len(pids)} processes gone")
        await call("undefine", name="demo")
    finally:
        with contextlib.suppress(Exception):
            if "demo" in daemon.runtimes:
                await call("stop", name="demo", force=True)
        await daemon.close()
        summary.figures["whole demo"] = f"{time.monotonic() - t_all:.1f} s"


def _reap_leftovers(state: Path) -> None:
    from mpqemu_mgmt.procfs import proc_start_time
    from mpqemu_mgmt.service.paths import StatePaths
    from mpqemu_mgmt.service.store import StateStore

    for rec in StateStore(StatePaths(state, state)).load_all():
        procs = [d.proc for d in rec.devices if d.proc] + ([rec.main] if rec.main else [])
        for proc in procs:
            if proc.start_time and proc_start_time(proc.pid) == proc.start_time:
                with contextlib.suppress(OSError):
                    os.kill(proc.pid, signal.SIGKILL)


def run_demo(ctx: Any, keep: bool = False) -> int:
    """The ``demo`` command. Returns the exit code."""
    def out(text: str) -> None:
        print(text, file=ctx.stdout, flush=True)

    root = Path(tempfile.mkdtemp(prefix="mpqemu-demo-", dir="/tmp"))
    root.chmod(0o711)
    summary = Summary()
    out("mpqemu-mgmt demo: one guest, PCI devices in confined processes, supervised")
    out(f"(scratch state in {root}; the demo runs its own service instance)\n")
    error: MpqemuError | None = None

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt  # SIGTERM cleans up like Ctrl-C does

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        asyncio.run(_demo(out, root, summary))
    except MpqemuError as exc:
        error = exc
        summary.ok = False
    finally:
        signal.signal(signal.SIGTERM, previous)
        # Ctrl-C or a failure half way: whatever the demo started must not outlive it (remotes are
        # launched to survive a service restart, so nothing else would take them down).
        _reap_leftovers(root / "state")
    out("\nSummary")
    for title, dt, note in summary.steps:
        out(f"  {title:<36} {dt:6.1f} s  {note}")
    for k, v in summary.figures.items():
        out(f"  {k:<48} {v}")
    if error is not None:
        out(f"  FAILED: {error.message}")
        out(f"  state kept in {root} (mpqemu-mgmt --state-dir {root}/state events)")
        return error.exit_code
    out("  result: OK")
    if keep:
        out(f"  state kept in {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0
