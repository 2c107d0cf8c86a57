"""A connection to a running libvirtd (started here with ``libvirtd -d`` / ``virtlogd -d`` if needed)."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpqemu_mgmt.guestkit.watch_guest import place_images, watch_images, watch_spec_toml
from tests.integration.service_fixture import Service

URI = "qemu:///system"


def virsh(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``virsh -c qemu:///system ARGV...``, output captured, never raising on its status."""
    return subprocess.run(["virsh", "-c", URI, *argv], capture_output=True, text=True, timeout=timeout,
                          check=False)


def domstate(name: str) -> str:
    """``virsh domstate``: "running", "shut off", ..., or "absent" when libvirt has no such domain."""
    p = virsh("domstate", name, timeout=30)
    return p.stdout.strip() if p.returncode == 0 else "absent"


def edu_watch_guest(service: Service, prefix: str, ready: str) -> tuple[str, Path, Path]:
    """A libvirt-driver spec for a watch guest (guestkit/watch_guest.py) with our edu, written
    into ``service.root``: its name, the spec file and where its console log will be. Skips the
    test when the guest images cannot be made here."""
    try:
        kernel, initrd = place_images(service.root / "images", watch_images(ready=ready))
    except Exception as exc:
        pytest.skip(f"no test guest: {exc}")
    name = f"{prefix}-{secrets.token_hex(3)}"
    spec = service.root / f"{name}.toml"
    spec.write_text(watch_spec_toml(name, kernel, initrd, [("edu0", "edu", "builtin")],
                                    driver="libvirt", uri=URI))
    return name, spec, service.state / "guests" / name / "console.log"


def _running(name: str) -> bool:
    return subprocess.run(["pgrep", "-x", name], capture_output=True, check=False).returncode == 0


def ensure_libvirtd() -> str | None:
    """None when libvirtd answers; else the reason it cannot."""
    if os.geteuid() != 0:
        return "libvirt system tests need root (qemu:///system)"
    if shutil.which("libvirtd") is None:
        return "libvirtd is not installed"
    for daemon in ("virtlogd", "libvirtd"):
        if not _running(daemon):
            subprocess.run([daemon, "-d"], check=False, timeout=30)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        probe = subprocess.run(["virsh", "-c", URI, "version"], capture_output=True, timeout=30, check=False)
        if probe.returncode == 0:
            return None
        time.sleep(0.3)
    return "libvirtd did not answer on qemu:///system"


@pytest.fixture(scope="session")
def libvirt_host() -> Iterator[object]:
    reason = ensure_libvirtd()
    if reason is not None:
        pytest.skip(reason)
    from mpqemu_mgmt.domain.libvirt_host import LibvirtHost

    host = LibvirtHost(URI)
    yield host
    host.close()
