"""The libvirt hook's pure table and metadata reading."""

from __future__ import annotations

import pytest

from mpqemu_mgmt.hook import Verdict, decide, our_devices

OURS = """<domain type='qemu'><name>g</name><metadata>
  <other:x xmlns:other='http://example.org/x'/>
  <mpq:guest xmlns:mpq='http://mpqemu-mgmt.org/xmlns/libvirt/1.0'>
    <mpq:devices><mpq:device id='edu0' model='edu'/><mpq:device id='lsi0' model='lsi53c895a'/></mpq:devices>
  </mpq:guest></metadata></domain>"""
FOREIGN = "<domain type='qemu'><name>g</name><metadata><n:i xmlns:n='http://openstack.org/x'/></metadata></domain>"


def test_our_devices() -> None:
    assert our_devices(OURS) == ["edu0", "lsi0"]
    assert our_devices(FOREIGN) is None
    assert our_devices("<domain><name>g</name></domain>") is None
    assert our_devices("") is None
    assert our_devices("<not xml") is None


@pytest.mark.parametrize("case", [
    ("prepare", "begin", ["edu0"], False, 1, False),
    ("prepare", "begin", ["edu0"], True, 0, False),
    ("prepare", "begin", None, False, 0, False),
    ("start", "begin", ["edu0"], False, 0, False),
    ("migrate", "begin", ["edu0"], True, 1, False),
    ("restore", "begin", ["edu0"], True, 1, False),
    ("migrate", "begin", None, False, 0, False),
    ("release", "end", ["edu0"], False, 0, True),
    ("reconnect", "begin", ["edu0"], False, 0, False),
    ("stopped", "end", ["edu0"], False, 0, False),
])
def test_decide_table(case: tuple[str, str, list[str] | None, bool, int, bool]) -> None:
    op, sub, devices, token, code, reap = case
    v = decide(op, sub, "g", devices, token)
    assert (v.code, v.reap) == (code, reap)
    if code:
        assert v.message.startswith("mpqemu-mgmt: ") and "\n" not in v.message


def test_refusals_name_the_way_out() -> None:
    assert "mpqemu-mgmt start g" in decide("prepare", "begin", "g", ["edu0"], False).message
    assert "migration" in decide("migrate", "begin", "g", ["edu0"], False).message
    assert decide("reconnect", "begin", "g", ["edu0"], False) == Verdict(0)


def test_reads_the_designers_real_metadata() -> None:
    from mpqemu_mgmt.domain.designer import design
    from mpqemu_mgmt.domain.spec import parse_spec
    from mpqemu_mgmt.hook import our_state_dir

    spec = parse_spec('name = "g"\ndriver = "libvirt"\n[[device]]\nid = "edu0"\nmodel = "edu"\n'
                      '[[device]]\nid = "lsi0"\nmodel = "lsi53c895a"\nbackend = "qemu"\n')
    xml = design(spec, state_dir="/var/lib/mpqemu-mgmt/guests/g").to_xml()
    assert our_devices(xml) == ["edu0", "lsi0"]
    assert our_state_dir(xml) == "/var/lib/mpqemu-mgmt/guests/g"
