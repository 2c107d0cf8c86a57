"""Golden QMP plans: qmp/<case>-<action>.json for the specs in xml/.

Remote argv as the service renders it as root (confined launcher, service profile: no
--die-with-parent), on the reference host of qmp/NOTES.md, so the files do not depend on where
this checkout or its venv live.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from mpqemu_mgmt.confine.launcher import LaunchRequest, profile_for
from mpqemu_mgmt.confine.profile import ConfinementProfile
from mpqemu_mgmt.confine.remote_argv import LaunchHost, confined_command, remote_fds_shape
from mpqemu_mgmt.domain.spec import DeviceSpec, GuestSpec, device_from_pairs, load_spec
from mpqemu_mgmt.orchestrate.plans import Plan, plan_for
from mpqemu_mgmt.orchestrate.qemu_argv import GuestPaths
from mpqemu_mgmt.resources import data_dir

XML = data_dir("xml")
QMP = data_dir("qmp")
UPDATE = os.environ.get("MPQEMU_UPDATE_GOLDEN") == "1"


#: the reference host of qmp/NOTES.md: a venv in /opt/mpqemu-mgmt, merged /usr
PYTHON = "/opt/mpqemu-mgmt/venv/bin/python"
SITE = "/opt/mpqemu-mgmt/venv/lib/python3.11/site-packages"
SYMLINKS = (("usr/bin", "/bin"), ("usr/sbin", "/sbin"), ("usr/lib", "/lib"), ("usr/lib64", "/lib64"))
SERVICE_PROFILE = replace(ConfinementProfile(), die_with_parent=False)


def reference_command(spec: GuestSpec, dev: DeviceSpec, paths: GuestPaths) -> tuple[str, ...]:
    """ConfinedLauncher.command on the reference host (same request, profile and fd shape)."""
    request = LaunchRequest(
        device_id=dev.id, model=dev.model, qmp_path=Path(paths.remote_qmp(dev.id)), backend=dev.backend,
        transport=dev.transport, backing=(Path(dev.backing),) if dev.backing else (),
        readonly=dev.readonly, qemu_binary=spec.qemu_binary,
        qemu_props=tuple(f"{k}={v}" for k, v in dev.props), python=PYTHON)
    profile = profile_for(dev.backend, SERVICE_PROFILE)
    builtin = dev.backend == "builtin"
    code = (f"{SITE}/mpqemu_mgmt", f"{SITE}/policies", "/opt/mpqemu-mgmt/venv") if builtin else ()
    host = LaunchHost("/usr/bin/prlimit", "/usr/bin/bwrap", (*code, "/etc/ld.so.cache"), SYMLINKS)
    return tuple(confined_command(request, profile, host, remote_fds_shape(request, profile)))


def _plans() -> dict[str, Plan]:
    demo = load_spec(XML / "pc-two-devices-in.toml")
    q35 = load_spec(XML / "q35-bridge-in.toml")
    state = f"/run/mpqemu-mgmt/{demo.name}"
    extra = device_from_pairs(["id=t1", "model=pci-testdev", "backend=qemu"])
    cmd = reference_command
    return {
        "pc-two-devices-start": plan_for(demo, "start", state_dir=state, remote_command=cmd),
        "pc-two-devices-attach": plan_for(demo, "attach", state_dir=state, device=extra, remote_command=cmd),
        "pc-two-devices-detach": plan_for(demo, "detach", state_dir=state, device_id="lsi0",
                                          remote_command=cmd),
        "pc-two-devices-reset": plan_for(demo, "reset", state_dir=state, remote_command=cmd),
        "pc-two-devices-hard-reset": plan_for(demo, "reset", state_dir=state, device_id="edu0",
                                              remote_command=cmd),
        "pc-two-devices-stop": plan_for(demo, "stop", state_dir=state, remote_command=cmd),
        "q35-bridge-start": plan_for(q35, "start", state_dir=f"/run/mpqemu-mgmt/{q35.name}",
                                     remote_command=cmd),
    }


PLANS = _plans()


@pytest.mark.parametrize("case", sorted(PLANS))
def test_golden_plan(case: str) -> None:
    text = PLANS[case].to_json()
    path = QMP / f"{case}.json"
    if UPDATE:
        path.write_text(text)
    assert json.loads(text) == json.loads(path.read_text())
    assert text == path.read_text()


def test_every_golden_file_has_a_case() -> None:
    assert sorted(p.stem for p in QMP.glob("*.json")) == sorted(PLANS)
