"""libvirtd accepts every golden domain XML (what ``virsh define --validate`` checks), then forgets it."""

from __future__ import annotations

import uuid

import pytest

from mpqemu_mgmt.domain.model import Domain
from mpqemu_mgmt.resources import data_dir
from tests.system.libvirt_fixture import libvirt_host, virsh  # noqa: F401 - fixture

XML = data_dir("xml")
CASES = sorted(p.name[: -len("-out.xml")] for p in XML.glob("*-out.xml"))


@pytest.mark.parametrize("case", CASES)
def test_libvirtd_validates_golden(case: str, libvirt_host) -> None:  # noqa: F811
    text = (XML / f"{case}-out.xml").read_text()
    dom = Domain.parse(text)
    # A unique name so concurrent runs (and other engineers' guests) never collide.
    dom.name = f"mpqt-{case}-{uuid.uuid4().hex[:8]}"
    guest = libvirt_host.define_validated(dom.to_xml())
    try:
        back = Domain.parse(guest.xml_desc(inactive=True))
        assert back.meta is not None and dom.meta is not None
        assert [d.id for d in back.meta.devices] == [d.id for d in dom.meta.devices]
        assert back.memfd == "memfd" and back.mem_access == "shared"
        assert back.acpi
    finally:
        guest.undefine()


def test_libvirtd_rejects_invalid(libvirt_host) -> None:  # noqa: F811
    from mpqemu_mgmt.errors import LibvirtError

    text = (XML / f"{CASES[0]}-out.xml").read_text().replace("<vcpu>", "<vcpu bogus='1'>")
    dom_text = text.replace("<name>", "<name>mpqt-invalid-", 1)
    with pytest.raises(LibvirtError):
        libvirt_host.define_validated(dom_text)


@pytest.mark.parametrize("case", CASES)
def test_virsh_define_validate(case: str, libvirt_host, tmp_path) -> None:  # noqa: F811
    """The literal operator command: ``virsh define --validate FILE``."""
    dom = Domain.parse((XML / f"{case}-out.xml").read_text())
    dom.name = f"mpqt-virsh-{case}-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "domain.xml"
    path.write_text(dom.to_xml())
    define = virsh("define", "--validate", str(path))
    try:
        assert define.returncode == 0, define.stderr
        assert f"Domain '{dom.name}' defined" in define.stdout
    finally:
        virsh("undefine", dom.name)
