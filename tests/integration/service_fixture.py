"""A real ``mpqemu-mgmt serve`` process in a scratch state directory, and a CLI runner against it.

The finalizer stops every guest, ends the service and SIGKILLs any process a record still names,
so no test can leave a QEMU or a remote behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from mpqemu_mgmt.procfs import proc_start_time


@dataclass
class Service:
    root: Path
    args: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None
    seen_pids: set[tuple[int, int]] = field(default_factory=set)

    @property
    def state(self) -> Path:
        return self.root / "st"

    def start(self) -> None:
        log = open(self.root / "serve.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mpqemu_mgmt.cli.app", "--state-dir", str(self.state), "serve",
             *self.args],
            stdout=log, stderr=log, start_new_session=True)
        log.close()
        deadline = time.monotonic() + 15
        while not (self.state / "service.pid").exists():
            assert self.proc.poll() is None, (self.root / "serve.log").read_text()
            assert time.monotonic() < deadline, "service did not come up"
            time.sleep(0.02)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(15)

    def cli(self, *argv: str, check: bool = True, timeout: float = 120) -> tuple[int, Any, str]:
        p = subprocess.run([sys.executable, "-m", "mpqemu_mgmt.cli.app", "--state-dir", str(self.state),
                            "--format", "json", *argv], capture_output=True, text=True, timeout=timeout,
                           check=False)
        data = json.loads(p.stdout) if p.stdout.strip().startswith(("{", "[")) else p.stdout
        if check:
            assert p.returncode == 0, f"{argv}: rc={p.returncode} {p.stderr}"
        self.note_pids()
        return p.returncode, data, p.stderr

    def events(self, guest: str | None = None) -> list[dict[str, Any]]:
        path = self.state / "events.jsonl"
        if not path.exists():
            return []
        evs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [e for e in evs if guest is None or e["guest"] == guest]

    def wait_event(self, guest: str, kind: str, device: str | None = None, timeout: float = 10,
                   after: float = 0.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for e in self.events(guest):
                if e["kind"] == kind and (device is None or e["device"] == device) and e["time"] >= after:
                    return e
            time.sleep(0.02)
        raise AssertionError(f"no {kind} event for {guest}/{device}; got {self.events(guest)[-8:]}")

    def note_pids(self) -> None:
        guests = self.state / "guests"
        if not guests.is_dir():
            return
        for rec in guests.glob("*/guest.json"):
            with contextlib.suppress(ValueError, OSError):
                d = json.loads(rec.read_text())
                procs = [d.get("main")] + [x.get("proc") for x in d.get("devices", [])]
                for p in procs:
                    if p and p.get("pid"):
                        self.seen_pids.add((int(p["pid"]), int(p.get("start_time") or 0)))

    def leftovers(self) -> list[int]:
        return [pid for pid, st in self.seen_pids if st and proc_start_time(pid) == st]


def write_spec(root: Path, name: str, *devices: dict[str, str], extra: str = "") -> Path:
    text = f'name = "{name}"\nmemory = "64M"\naccel = "tcg"\n{extra}'
    for dev in devices:
        text += "\n[[device]]\n" + "".join(f'{k} = "{v}"\n' for k, v in dev.items())
    path = root / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.fixture
def service() -> Iterator[Service]:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    root = Path(tempfile.mkdtemp(prefix="mq-", dir="/tmp"))  # short: UNIX socket paths max 107 bytes
    root.chmod(0o711)
    svc = Service(root)
    svc.start()
    try:
        yield svc
    finally:
        svc.note_pids()
        if svc.proc is not None and svc.proc.poll() is None:
            for rec in (svc.state / "guests").glob("*/guest.json"):
                with contextlib.suppress(Exception):
                    svc.cli("stop", rec.parent.name, "--force", check=False, timeout=30)
            svc.kill(signal.SIGTERM)
        for pid in svc.leftovers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
