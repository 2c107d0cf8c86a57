"""The guest spec: what parses, and that every error names the file, the key and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpqemu_mgmt.domain.spec import (
    device_from_pairs,
    is_local_uri,
    load_spec,
    parse_memory,
    parse_spec,
    spec_from_dict,
)
from mpqemu_mgmt.errors import NonLocalUri, OneDevicePerProcess, SpecError

GOOD = """
name = "demo"
memory = "512M"
machine = "q35"
accel = "tcg"
driver = "direct"
[boot]
kernel = "/k"
initrd = "/i"
cmdline = "console=ttyS0"
[[device]]
id = "edu0"
model = "edu"
[[device]]
id = "lsi0"
model = "lsi53c895a"
backend = "qemu"
props = { a = 1, b = true, c = "x" }
"""


def test_good_spec() -> None:
    spec = parse_spec(GOOD, "demo.toml")
    assert spec.name == "demo" and spec.memory_mib == 512 and spec.machine == "q35"
    assert spec.boot is not None and spec.boot.initrd == "/i"
    assert [d.id for d in spec.devices] == ["edu0", "lsi0"]
    edu, lsi = spec.devices
    assert (edu.backend, edu.transport, edu.on_failure) == ("builtin", "mpqemu", "replug")
    assert lsi.props == (("a", "1"), ("b", "on"), ("c", "x"))
    assert spec_from_dict(spec.to_dict(), "again") == spec


def _with(extra: str, base: str = 'name = "g"\n') -> str:
    return base + extra


BAD = [
    ('memory = "12Q"', "memory", "size"),
    ('memory = "8M"', "memory", "between"),
    ('machine = "virt"', "machine", "one of pc, q35"),
    ('accel = "hvf"', "accel", "one of"),
    ('driver = "xen"', "driver", "one of"),
    ('uri = "qemu:///system"', "uri", "only meaningful"),
    ('bogus = 1', "bogus", "unknown key"),
    ('vcpus = 0', "vcpus", "1..64"),
    ('[boot]\ninitrd = "/i"', "boot.kernel", "required"),
    ('[[device]]\nmodel = "edu"', "device[0].id", "required"),
    ('[[device]]\nid = "9x"\nmodel = "edu"', "device[0].id", "not a QEMU id"),
    ('[[device]]\nid = "a"\nmodel = "e1000"', "device[0].model", "not a builtin model"),
    ('[[device]]\nid = "a"\nmodel = "edu"\nbackend = "rust"', "device[0].backend", "one of builtin, qemu"),
    ('[[device]]\nid = "a"\nmodel = "edu"\ntransport = "tcp"', "device[0].transport", "one of"),
    ('[[device]]\nid = "a"\nmodel = "e1000"\nbackend = "qemu"\ntransport = "vfio-user"',
     "device[0].transport", "only the mpqemu"),
    ('[[device]]\nid = "a"\nmodel = "edu"\non_failure = "panic"', "device[0].on_failure", "one of"),
    ('[[device]]\nid = "a"\nmodel = "edu"\nreadonly = "yes"', "device[0].readonly", "true or false"),
    ('[[device]]\nid = "a"\nmodel = "e1000"\nbackend = "qemu"\nprops = { mac = "1,x=2" }',
     "device[0].props.mac", "must not contain"),
    ('[[device]]\nid = "a"\nmodel = "e1000"\nbackend = "qemu"\nprops = { bus = "pci.0" }',
     "device[0].props.bus", "not a settable"),
    ('[[device]]\nid = "a"\nmodel = "edu"\n[[device]]\nid = "a"\nmodel = "edu"', "device[1].id", "duplicate"),
    ('name2 = 1', "name2", "unknown key"),
    ('[[device]]\nid = "a"\nmodel = "edu"\npoll_us = -1', "device[0].poll_us", "from 0 to 10000"),
    ('[[device]]\nid = "a"\nmodel = "edu"\npoll_us = 10001', "device[0].poll_us", "from 0 to 10000"),
    ('[[device]]\nid = "a"\nmodel = "edu"\npoll_us = true', "device[0].poll_us", "from 0 to 10000"),
    ('[[device]]\nid = "a"\nmodel = "edu"\npoll_us = "50"', "device[0].poll_us", "from 0 to 10000"),
    ('[[device]]\nid = "a"\nmodel = "e1000"\nbackend = "qemu"\npoll_us = 0', "device[0].poll_us",
     "builtin remotes only"),
]


@pytest.mark.parametrize(("text", "key", "what"), BAD)
def test_errors_name_file_key_reason(text: str, key: str, what: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(_with(text), "g.toml")
    err = info.value
    assert err.details["file"] == "g.toml"
    assert err.details["key"] == key
    assert what in err.message
    assert err.message.startswith(f"g.toml: {key}: ")
    assert err.exit_code == 2


def test_bad_name_and_syntax() -> None:
    with pytest.raises(SpecError, match="name"):
        parse_spec('name = "a b"', "x.toml")
    with pytest.raises(SpecError, match=r"x\.toml: not valid TOML"):
        parse_spec("name = ", "x.toml")
    with pytest.raises(SpecError, match="name: is required"):
        parse_spec("", "x.toml")


def test_load_spec_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="cannot read") as info:
        load_spec(tmp_path / "nope.toml")
    assert info.value.details["file"].endswith("nope.toml")


def test_second_device_in_one_remote_is_refused() -> None:
    one = '[[device]]\nid = "{}"\nmodel = "edu"\nremote = "r"\n'
    text = _with(one.format("a") + one.format("b"))
    with pytest.raises(OneDevicePerProcess) as info:
        parse_spec(text, "g.toml")
    assert info.value.exit_code == 3
    assert "exactly one device" in info.value.message


@pytest.mark.parametrize(("uri", "local"), [
    ("qemu:///system", True), ("qemu:///session", True), ("qemu+unix:///system", True),
    ("qemu+ssh://host/system", False), ("qemu+tcp://10.0.0.1/system", False), ("qemu://host/system", False),
])
def test_local_uri(uri: str, local: bool) -> None:
    assert is_local_uri(uri) is local


def test_non_local_uri_refused_only_with_devices() -> None:
    base = 'name = "g"\ndriver = "libvirt"\nuri = "qemu+ssh://h/system"\n'
    assert parse_spec(base).uri == "qemu+ssh://h/system"
    with pytest.raises(NonLocalUri) as info:
        parse_spec(base + '[[device]]\nid = "a"\nmodel = "edu"\n', "g.toml")
    assert info.value.exit_code == 3 and info.value.details["key"] == "uri"


@pytest.mark.parametrize(("value", "mib"), [("256M", 256), ("1G", 1024), (512, 512), ("2048MiB", 2048),
                                            ("65536K", 64)])
def test_memory(value: object, mib: int) -> None:
    assert parse_memory(value) == mib


def test_device_from_pairs() -> None:
    dev = device_from_pairs(["id=t1", "model=pci-testdev", "backend=qemu", "props.x=1", "readonly=true"])
    assert (dev.id, dev.model, dev.backend, dev.props, dev.readonly) == ("t1", "pci-testdev", "qemu",
                                                                        (("x", "1"),), True)
    with pytest.raises(SpecError, match="KEY=VALUE"):
        device_from_pairs(["id"])


def test_poll_us_from_toml_pairs_and_back() -> None:
    spec = parse_spec(_with('[[device]]\nid = "a"\nmodel = "edu"\npoll_us = 0'), "g.toml")
    [*_, dev] = spec.devices
    assert dev.poll_us == 0 and dev.to_dict()["poll_us"] == 0
    assert "poll_us" not in parse_spec(GOOD).devices[0].to_dict()  # unset: the remote's default
    assert device_from_pairs(["id=t1", "model=edu", "poll_us=50"]).poll_us == 50
    for bad in ("x", "-1", "1.5", "99999"):
        with pytest.raises(SpecError, match=r"poll_us: must be an integer from 0 to 10000"):
            device_from_pairs(["id=t1", "model=edu", f"poll_us={bad}"])


def test_with_device_checks_duplicates() -> None:
    spec = parse_spec(GOOD)
    with pytest.raises(SpecError, match="duplicate"):
        spec.with_device(spec.devices[0])
    assert [d.id for d in spec.without_device("edu0").devices] == ["lsi0"]
