"""The service end to end through the CLI: a real `mpqemu-mgmt serve`, real QEMU processes (a main
QEMU with no guest OS and stock x-remote devices), real files. Lifecycle, idempotency, Contract-4
status, audit (who via SO_PEERCRED), events, metrics file, the control socket's mode."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from mpqemu_mgmt.errors import EXIT_FAILED, EXIT_REFUSED, EXIT_USAGE
from tests.integration.service_fixture import Service, service, write_spec

__all__ = ["service"]

TESTDEV = {"id": "t0", "model": "pci-testdev", "backend": "qemu"}


def test_lifecycle_idempotent_with_status_audit_and_events(service: Service) -> None:
    assert stat.S_IMODE((service.state / "control.sock").stat().st_mode) == 0o600
    spec = write_spec(service.root, "g1", TESTDEV)
    _, res, _ = service.cli("define", str(spec))
    assert res == {"name": "g1", "changed": True, "state": "defined"}
    assert service.cli("define", str(spec))[1]["changed"] is False

    _, res, _ = service.cli("start", "g1")
    assert res["changed"] is True and res["state"] == "running"
    assert service.cli("start", "g1")[1]["changed"] is False

    _, st, _ = service.cli("status", "g1")
    assert st["name"] == "g1" and st["state"] == "running" and st["driver"] == "direct"
    (dev,) = st["devices"]
    assert dev["id"] == "t0" and dev["model"] == "pci-testdev" and dev["backend"] == "qemu"
    assert isinstance(dev["pid"], int) and dev["restarts"] == 0
    assert set(dev["confinement"]) >= {"seccomp", "namespaces", "uid"}
    os.kill(dev["pid"], 0)
    service.wait_event("g1", "healthy", "t0", timeout=5)
    _, st, _ = service.cli("status", "g1")
    assert st["devices"][0]["health"] == "healthy"

    _, rows, _ = service.cli("list")
    assert [(r["name"], r["state"], r["devices"]) for r in rows] == [("g1", "running", 1)]

    # attach to a running guest: a real device_add; again: unchanged; a different device, same id: usage
    _, res, _ = service.cli("attach", "g1", "id=t1", "model=pci-testdev", "backend=qemu")
    assert res["changed"] is True and res["plugged"] is True
    assert service.cli("attach", "g1", "id=t1", "model=pci-testdev", "backend=qemu")[1]["changed"] is False
    assert service.cli("attach", "g1", "id=t1", "model=edu", check=False)[0] == EXIT_USAGE

    code, _, err = service.cli("undefine", "g1", check=False)
    assert code == EXIT_REFUSED and "stop it first" in err
    code, _, err = service.cli("reset", "nosuch", check=False)
    assert code == EXIT_FAILED and "no guest" in err

    _, res, _ = service.cli("stop", "g1", "--force")
    assert res == {"name": "g1", "changed": True, "state": "stopped"}
    assert service.cli("stop", "g1")[1]["changed"] is False
    assert service.leftovers() == []
    assert service.cli("undefine", "g1")[1]["changed"] is True
    assert service.cli("undefine", "g1")[1]["changed"] is False

    audit = [line for line in (service.state / "audit.jsonl").read_text().splitlines()]
    import json

    entries = [json.loads(a) for a in audit]
    assert all(e["uid"] == os.geteuid() and e["pid"] for e in entries)
    starts = [e for e in entries if e["command"] == "start"]
    assert starts[0]["result"] == "ok" and starts[1]["result"] == "unchanged"
    assert any("device_add" in c for c in starts[0]["calls"]), starts[0]["calls"]
    assert any(e["command"] == "undefine" and e["result"] == "error" for e in entries)
    kinds = [e["kind"] for e in service.events("g1")]
    for k in ("defined", "starting", "running", "healthy", "attached", "stopped", "undefined"):
        assert k in kinds


def test_attach_to_stopped_guest_is_plugged_at_start_and_detach_stopped(service: Service) -> None:
    spec = write_spec(service.root, "g2")
    service.cli("define", str(spec))
    _, res, _ = service.cli("attach", "g2", "id=t0", "model=pci-testdev", "backend=qemu")
    assert res["plugged"] is False
    service.cli("start", "g2")
    _, st, _ = service.cli("status", "g2")
    assert [d["id"] for d in st["devices"]] == ["t0"] and st["devices"][0]["pid"]
    service.cli("stop", "g2", "--force")
    assert service.cli("detach", "g2", "t0")[1]["changed"] is True
    assert service.cli("detach", "g2", "t0")[1]["changed"] is False
    assert service.cli("status", "g2")[1]["devices"] == []


def test_logs_and_table_output(service: Service) -> None:
    spec = write_spec(service.root, "g3", TESTDEV)
    service.cli("define", str(spec))
    service.cli("start", "g3")
    code, out, _ = service.cli("logs", "g3", "t0")
    assert code == 0 and "path" in out
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "mpqemu_mgmt.cli.app", "--state-dir", str(service.state),
                        "status", "g3"], capture_output=True, text=True, timeout=30, check=False)
    assert p.returncode == 0 and "pci-testdev" in p.stdout
    assert p.stdout.splitlines()[0].split() == ["name", "g3"]
    service.cli("stop", "g3", "--force")


def test_metrics_file() -> None:
    import shutil
    import tempfile

    if shutil.which("qemu-system-x86_64") is None:
        import pytest

        pytest.skip("qemu-system-x86_64 is not installed")
    root = Path(tempfile.mkdtemp(prefix="mq-", dir="/tmp"))
    root.chmod(0o711)  # the unprivileged QEMU must reach its guest directory below
    metrics = root / "metrics.prom"
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    svc = Service(root, args=("--metrics-file", str(metrics), "--metrics-listen", f"127.0.0.1:{port}"))
    svc.start()
    try:
        svc.cli("define", str(write_spec(root, "m1", TESTDEV)))
        svc.cli("start", "m1")
        deadline = time.monotonic() + 10
        text = ""
        while time.monotonic() < deadline:
            text = metrics.read_text() if metrics.exists() else ""
            if 'state="healthy"} 1' in text and "mpqemu_heartbeat_latency_seconds{" in text:
                break
            time.sleep(0.1)
        assert 'mpqemu_device_health{guest="m1",device="t0",state="healthy"} 1' in text
        assert 'mpqemu_guest_running{guest="m1"} 1' in text
        assert "mpqemu_device_restarts_total" in text
        import urllib.error
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            scraped = resp.read().decode()
        assert 'mpqemu_device_health{guest="m1",device="t0",state="healthy"} 1' in scraped
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/other", timeout=10)
            raise AssertionError("only /metrics is served")
        except urllib.error.HTTPError as exc:
            assert exc.code == 404
        svc.cli("stop", "m1", "--force")
    finally:
        import signal

        svc.kill(signal.SIGTERM)
        for pid in svc.leftovers():
            os.kill(pid, 9)
        shutil.rmtree(root, ignore_errors=True)


def test_second_service_on_the_same_state_dir_is_refused(service: Service) -> None:
    import subprocess
    import sys

    argv = [sys.executable, "-m", "mpqemu_mgmt.cli.app", "--state-dir", str(service.state), "serve"]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert p.returncode == EXIT_REFUSED and "already runs" in p.stderr
    assert service.cli("list")[0] == 0  # the first one still owns its socket
