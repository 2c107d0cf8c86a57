"""examples/automation.py, the OpenStack-style script, against a real service: up twice (second run
changes nothing), check, a remote killed between runs is recovered or reported, down twice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mpqemu_mgmt.resources import repo_root
from tests.integration.service_fixture import Service, service, write_spec

__all__ = ["service"]


def run_script(svc: Service, *args: str) -> tuple[int, list[dict[str, object]]]:
    root = repo_root()
    assert root is not None
    cli = f"{sys.executable} -m mpqemu_mgmt.cli.app"
    p = subprocess.run([sys.executable, str(root / "examples" / "automation.py"), *args,
                        "--state-dir", str(svc.state), "--cli", cli],
                       capture_output=True, text=True, timeout=180, check=False)
    svc.note_pids()
    return p.returncode, [json.loads(line) for line in p.stdout.splitlines() if line.strip()]


def changed(lines: list[dict[str, object]]) -> dict[str, object]:
    return {f"{s['step']}:{s.get('device', '')}": s.get("changed") for s in lines if "changed" in s}


def test_automation_up_check_down_idempotent(service: Service) -> None:
    spec = write_spec(service.root, "os1", {"id": "t0", "model": "pci-testdev", "backend": "qemu"})
    args = ("up", "--spec", str(spec), "--device", "id=t1,model=pci-testdev,backend=builtin")
    code, first = run_script(service, *args)
    assert code == 0, first
    assert changed(first) == {"define:": True, "start:": True, "attach:t1": True}
    health = next(s for s in first if s["step"] == "health")
    assert health["devices"] == {"t0": "healthy", "t1": "healthy"}

    code, second = run_script(service, *args)
    assert code == 0 and changed(second) == {"define:": False, "start:": False, "attach:t1": False}

    code, out = run_script(service, "check", "--name", "os1")
    assert code == 0 and out[-1]["step"] == "health"

    code, out = run_script(service, "down", "--name", "os1")
    assert code == 0 and changed(out) == {"stop:": True, "undefine:": True}
    code, out = run_script(service, "down", "--name", "os1")
    assert code == 0 and changed(out) == {"stop:": False, "undefine:": False}
    assert service.leftovers() == []


def test_automation_reports_a_failed_step_as_json(service: Service, tmp_path: Path) -> None:
    bad = write_spec(service.root, "os2", {"id": "t0", "model": "nosuch", "backend": "builtin"})
    code, out = run_script(service, "up", "--spec", str(bad))
    assert code == 1 and out[-1]["step"] == "define" and out[-1]["failed"] is True
    assert out[-1]["error"]["error"] == "SpecError"  # type: ignore[index]
