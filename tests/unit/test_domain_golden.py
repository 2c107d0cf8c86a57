"""Golden domain XML: xml/<case>-in.toml → xml/<case>-out.xml, byte for byte, and back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mpqemu_mgmt.domain.designer import design, spec_from_domain
from mpqemu_mgmt.domain.model import Domain
from mpqemu_mgmt.domain.spec import load_spec
from mpqemu_mgmt.resources import data_dir

XML = data_dir("xml")
CASES = sorted(p.name[: -len("-in.toml")] for p in XML.glob("*-in.toml"))
UPDATE = os.environ.get("MPQEMU_UPDATE_GOLDEN") == "1"


def test_there_are_cases() -> None:
    assert len(CASES) >= 3


@pytest.mark.parametrize("case", CASES)
def test_golden_xml(case: str) -> None:
    spec = load_spec(XML / f"{case}-in.toml")
    xml = design(spec, state_dir=f"/run/mpqemu-mgmt/{spec.name}").to_xml()
    out = XML / f"{case}-out.xml"
    if UPDATE:
        out.write_text(xml)
    assert xml == out.read_text()


@pytest.mark.parametrize("case", CASES)
def test_golden_parses_back(case: str) -> None:
    spec = load_spec(XML / f"{case}-in.toml")
    text = (XML / f"{case}-out.xml").read_text()
    dom = Domain.parse(text, source=case)
    assert dom.to_xml() == text
    assert spec_from_domain(dom) == spec


@pytest.mark.parametrize("case", CASES)
def test_golden_shape(case: str) -> None:
    """The rules of the brief, checked on the output rather than trusted."""
    text = (XML / f"{case}-out.xml").read_text()
    dom = Domain.parse(text)
    spec = load_spec(XML / f"{case}-in.toml")
    assert dom.memfd == "memfd" and dom.mem_access == "shared"
    assert dom.acpi
    assert "qemu:commandline" not in text and "libvirt.org/schemas/domain/qemu" not in text
    assert dom.type == ("qemu" if spec.accel == "tcg" else "kvm")
    assert dom.meta is not None and [d.id for d in dom.meta.devices] == [d.id for d in spec.devices]
    models = [c.model for c in dom.controllers if c.type == "pci"]
    if spec.machine == "q35":
        assert models == ["pcie-root", "pcie-root-port", "pcie-to-pci-bridge"]
        assert {d.bus for d in dom.meta.devices} <= {"pci.2"}
    else:
        assert models == ["pci-root"]
        assert {d.bus for d in dom.meta.devices} <= {"pci.0"}
    slots = [d.slot for d in dom.meta.devices]
    assert len(slots) == len(set(slots))
    if spec.boot:
        assert dom.kernel == spec.boot.kernel


def test_parse_rejects_non_domain() -> None:
    from mpqemu_mgmt.errors import SpecError

    with pytest.raises(SpecError, match="not <domain>"):
        Domain.parse("<network/>", source="x.xml")
    with pytest.raises(SpecError, match="well-formed"):
        Domain.parse("<domain>", source="x.xml")


def test_spec_from_domain_needs_our_metadata(tmp_path: Path) -> None:
    from mpqemu_mgmt.errors import SpecError

    with pytest.raises(SpecError, match="metadata"):
        spec_from_domain(Domain.parse("<domain type='qemu'><name>x</name></domain>"))
