"""`events --follow` streams JSON lines as the service writes them; progress goes to a TTY's
stderr only (and never into stdout's data)."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

from mpqemu_mgmt.service.events import EventLog
from tests.integration.service_fixture import Service, service, write_spec

__all__ = ["service"]


def test_events_follow_streams_json_lines(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl")
    log.emit("defined", "g")
    log.emit("defined", "other")
    p = subprocess.Popen([sys.executable, "-m", "mpqemu_mgmt.cli.app", "--state-dir", str(tmp_path),
                          "--format", "json", "events", "g", "--follow"], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        first = json.loads(p.stdout.readline())
        assert (first["guest"], first["kind"]) == ("g", "defined")
        log.emit("hung", "g", "edu0", "no answer")
        log.emit("hung", "other", "x")
        log.emit("dead", "g", "edu0", "process signal 9")
        second, third = json.loads(p.stdout.readline()), json.loads(p.stdout.readline())
        assert [(e["kind"], e["device"]) for e in (second, third)] == [("hung", "edu0"), ("dead", "edu0")]
    finally:
        p.terminate()
        p.wait(5)


def test_progress_on_a_tty_only(service: Service) -> None:
    service.cli("define", str(write_spec(service.root, "tty1", {"id": "t0", "model": "pci-testdev",
                                                                "backend": "qemu"})))
    argv = [sys.executable, "-m", "mpqemu_mgmt.cli.app", "--state-dir", str(service.state), "start", "tty1"]
    primary, secondary = pty.openpty()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=secondary, text=True)
    os.close(secondary)
    out, _ = p.communicate(timeout=60)
    tty_text = b""
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and select.select([primary], [], [], 0.1)[0]:
        try:
            chunk = os.read(primary, 4096)
        except OSError:
            break
        if not chunk:
            break
        tty_text += chunk
    os.close(primary)
    service.note_pids()
    assert p.returncode == 0
    assert b"starting tty1" in tty_text and b"device t0" in tty_text
    assert "starting" not in out and "state" in out  # data only on stdout
    # not a TTY: no progress at all
    code, _, err = service.cli("stop", "tty1", "--force")
    assert code == 0 and err == ""
