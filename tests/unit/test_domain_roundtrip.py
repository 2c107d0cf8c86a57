"""Property: any valid spec survives spec → TOML tables → spec, and spec → domain XML → spec."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mpqemu_mgmt.domain.designer import design, spec_from_domain
from mpqemu_mgmt.domain.model import Domain
from mpqemu_mgmt.domain.spec import BUILTIN_MODELS, BootSpec, DeviceSpec, GuestSpec, spec_from_dict

ids = st.from_regex(r"[a-z][a-z0-9_-]{0,10}", fullmatch=True)
text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=20)
# id, driver, bus and addr are ours to set (spec.py refuses them as props)
prop_keys = ids.filter(lambda k: k not in ("id", "driver", "bus", "addr"))
prop_values = st.from_regex(r"[A-Za-z0-9:._/-]{1,12}", fullmatch=True)


@st.composite
def devices(draw: st.DrawFn) -> tuple[DeviceSpec, ...]:
    names = draw(st.lists(ids, unique=True, max_size=6))
    out = []
    for name in names:
        backend = draw(st.sampled_from(["builtin", "qemu"]))
        model = draw(st.sampled_from(BUILTIN_MODELS)) if backend == "builtin" else draw(
            st.sampled_from(["lsi53c895a", "e1000", "pci-testdev", "virtio-rng-pci"]))
        out.append(DeviceSpec(
            id=name, model=model, backend=backend,
            transport=draw(st.sampled_from(["mpqemu", "vfio-user"])) if backend == "builtin" else "mpqemu",
            on_failure=draw(st.sampled_from(["replug", "pause", "stop", "ignore"])),
            backing=draw(st.none() | st.just("/var/lib/x.img")),
            readonly=draw(st.booleans()),
            props=tuple(sorted(draw(st.dictionaries(prop_keys, prop_values, max_size=3)).items())),
        ))
    return tuple(out)


@st.composite
def specs(draw: st.DrawFn) -> GuestSpec:
    boot = draw(st.none() | st.builds(BootSpec, kernel=st.just("/boot/k"),
                                      initrd=st.none() | st.just("/boot/i"), cmdline=text))
    return GuestSpec(
        name=draw(ids), memory_mib=draw(st.integers(16, 65536)), machine=draw(st.sampled_from(["pc", "q35"])),
        accel=draw(st.sampled_from(["kvm", "tcg"])), driver=draw(st.sampled_from(["direct", "libvirt"])),
        vcpus=draw(st.integers(1, 8)), boot=boot, devices=draw(devices()),
    )


@settings(max_examples=40, deadline=None)
@given(specs())
def test_spec_tables_round_trip(spec: GuestSpec) -> None:
    assert spec_from_dict(spec.to_dict()) == spec


@settings(max_examples=40, deadline=None)
@given(specs())
def test_domain_xml_round_trip(spec: GuestSpec) -> None:
    xml = design(spec, state_dir=f"/run/mpqemu-mgmt/{spec.name}").to_xml()
    dom = Domain.parse(xml)
    assert dom.to_xml() == xml
    back = spec_from_domain(dom)
    # The XML does not carry the libvirt URI or a direct driver's defaults beyond what the spec had.
    assert back.devices == spec.devices
    assert (back.name, back.memory_mib, back.machine, back.accel, back.vcpus) == (
        spec.name, spec.memory_mib, spec.machine, spec.accel, spec.vcpus)
    assert back.boot == spec.boot
