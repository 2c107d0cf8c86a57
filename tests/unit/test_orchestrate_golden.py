"""Golden QMP plans: qmp/<case>-<action>.json for the specs in xml/."""

from __future__ import annotations

import json
import os

import pytest

from mpqemu_mgmt.domain.spec import device_from_pairs, load_spec
from mpqemu_mgmt.orchestrate.plans import Plan, plan_for
from mpqemu_mgmt.resources import data_dir

XML = data_dir("xml")
QMP = data_dir("qmp")
UPDATE = os.environ.get("MPQEMU_UPDATE_GOLDEN") == "1"


def _plans() -> dict[str, Plan]:
    demo = load_spec(XML / "pc-two-devices-in.toml")
    q35 = load_spec(XML / "q35-bridge-in.toml")
    state = f"/run/mpqemu-mgmt/{demo.name}"
    extra = device_from_pairs(["id=t1", "model=pci-testdev", "backend=qemu"])
    return {
        "pc-two-devices-start": plan_for(demo, "start", state_dir=state),
        "pc-two-devices-attach": plan_for(demo, "attach", state_dir=state, device=extra),
        "pc-two-devices-detach": plan_for(demo, "detach", state_dir=state, device_id="lsi0"),
        "pc-two-devices-reset": plan_for(demo, "reset", state_dir=state),
        "pc-two-devices-hard-reset": plan_for(demo, "reset", state_dir=state, device_id="edu0"),
        "pc-two-devices-stop": plan_for(demo, "stop", state_dir=state),
        "q35-bridge-start": plan_for(q35, "start", state_dir=f"/run/mpqemu-mgmt/{q35.name}"),
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
