"""The installed hook recognises the start token of the service that designed the guest (its
``<mpq:state-dir>``), not only the one in its own state directory: one hook per host, several
services with their own ``--state-dir`` (tests do exactly that, a real host may too)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mpqemu_mgmt.hook import install, owner_paths
from mpqemu_mgmt.service.paths import StatePaths


def xml(name: str, state_dir: str) -> str:
    return (f"<domain type='qemu'><name>{name}</name><metadata>"
            "<mpq:guest xmlns:mpq='http://mpqemu-mgmt.org/x'>"
            f"<mpq:state-dir>{state_dir}</mpq:state-dir><mpq:device id='edu0'/></mpq:guest>"
            "</metadata></domain>")


def run_hook(script: Path, stdin: str, *argv: str) -> tuple[int, str]:
    p = subprocess.run([str(script), *argv], input=stdin, capture_output=True, text=True, timeout=10,
                       check=False, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})
    return p.returncode, p.stderr


def test_owner_paths_only_for_the_service_layout() -> None:
    assert owner_paths(xml("g1", "/srv/a/guests/g1"), "g1") == StatePaths(Path("/srv/a"), Path("/srv/a"))
    assert owner_paths(xml("g1", "/srv/a/guests/other"), "g1") is None  # not this guest's directory
    assert owner_paths(xml("g1", "/srv/a/g1"), "g1") is None  # not a service's guests/ layout
    assert owner_paths("<domain><name>g1</name></domain>", "g1") is None


def test_prepare_accepts_the_owning_services_token(tmp_path: Path) -> None:
    script = install(tmp_path / "qemu.d", sys.executable, str(tmp_path / "hook-state"))
    other = tmp_path / "svc"
    domain = xml("g1", str(other / "guests" / "g1"))
    code, err = run_hook(script, domain, "g1", "prepare", "begin", "-")
    assert code == 1 and "mpqemu-mgmt start g1" in err  # nobody is starting it
    (other / "starting").mkdir(parents=True)
    (other / "starting" / "g1").write_text(f"{os.getpid()}\n")
    assert run_hook(script, domain, "g1", "prepare", "begin", "-")[0] == 0
    # the token names one guest: another guest of that service is still refused
    assert run_hook(script, xml("g2", str(other / "guests" / "g2")), "g2", "prepare", "begin", "-")[0] == 1
    (other / "starting" / "g1").write_text("999999999\n")  # a dead service's token does not count
    assert run_hook(script, domain, "g1", "prepare", "begin", "-")[0] == 1
