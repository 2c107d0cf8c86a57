"""Policy: a :class:`GuestSpec` → the :class:`Domain` model libvirt gets (Nova's designer.py split).

Decisions made here, each for a reason:

* ``<domain type='qemu'>`` for ``accel = "tcg"``, ``'kvm'`` otherwise.
* RAM in a shared memfd (``<memoryBacking><source type='memfd'/><access mode='shared'/>``): the
  remote maps guest RAM from the fds that ``SYNC_SYSMEM`` carries (hw/remote/mpqemu-link.c), which
  needs a shareable backend (docs/system/multi-process.rst).
* ACPI on: ``pc`` hot-plug on ``pci.0`` is ACPI PCI hot-plug (hw/acpi/pcihp.c).
* ``q35``: a ``pcie-root-port`` and a ``pcie-to-pci-bridge`` behind it, reserved for proxy devices
  (``pcie.0`` does not hot-plug; x-pci-proxy-dev is conventional PCI). See topology.py.
* Direct kernel boot when the spec has ``[boot]``; serial console to a file in the state directory.
* No USB controller, balloon or graphics, so nothing competes with proxies for slots.
* Our devices go into ``<metadata>`` (mpq namespace), never into ``<qemu:commandline>``.

Pure: no libvirt, no filesystem. :func:`spec_from_domain` reads a spec back from our metadata.
"""

from __future__ import annotations

from typing import Any, Final

from mpqemu_mgmt.domain import topology
from mpqemu_mgmt.domain.model import Controller, Domain, MetaDevice, MetaGuest, MetaProp
from mpqemu_mgmt.domain.spec import BootSpec, GuestSpec, spec_from_dict
from mpqemu_mgmt.errors import SpecError

DEFAULT_EMULATOR_DIR: Final = "/usr/bin"


def emulator_path(binary: str) -> str:
    """libvirt needs an absolute emulator path; a bare name means the Debian location."""
    return binary if binary.startswith("/") else f"{DEFAULT_EMULATOR_DIR}/{binary}"


def controllers(machine: str) -> list[Controller]:
    if machine == "q35":
        return [
            Controller(type="pci", index=0, model="pcie-root"),
            Controller(type="pci", index=1, model="pcie-root-port", chassis=1, port="0x10",
                       addr_bus="0x00", addr_slot=f"0x{topology.Q35_ROOT_PORT_SLOT:02x}"),
            Controller(type="pci", index=2, model="pcie-to-pci-bridge", addr_bus="0x01", addr_slot="0x00"),
            Controller(type="usb", index=0, model="none"),
        ]
    return [Controller(type="pci", index=0, model="pci-root"), Controller(type="usb", index=0, model="none")]


def design(spec: GuestSpec, *, state_dir: str,
           placements: dict[str, topology.Placement] | None = None) -> Domain:
    places = topology.place(spec.machine, [d.id for d in spec.devices], placements)
    meta = MetaGuest(
        driver=spec.driver, state_dir=state_dir, qemu_binary=spec.qemu_binary,
        devices=[
            MetaDevice(
                id=d.id, model=d.model, backend=d.backend, transport=d.transport, on_failure=d.on_failure,
                remote=d.remote or None, readonly="yes" if d.readonly else "no",
                bus=places[d.id].bus, slot=places[d.id].addr, backing=d.backing,
                props=[MetaProp(k, v) for k, v in d.props],
            )
            for d in spec.devices
        ],
    )
    boot: BootSpec | None = spec.boot
    return Domain(
        type="qemu" if spec.accel == "tcg" else "kvm",
        name=spec.name,
        meta=meta,
        memory=spec.memory_mib,
        current_memory=spec.memory_mib,
        vcpus=spec.vcpus,
        machine=spec.machine,
        kernel=boot.kernel if boot else None,
        initrd=boot.initrd if boot else None,
        cmdline=boot.cmdline if boot and boot.cmdline else None,
        emulator=emulator_path(spec.qemu_binary),
        controllers=controllers(spec.machine),
        console_path=f"{state_dir}/console.log",
    )


def spec_from_domain(dom: Domain, source: str = "<domain xml>") -> GuestSpec:
    """The guest spec our metadata and the domain's own elements describe (for ``xml`` round trips)."""
    if dom.meta is None:
        raise SpecError(f"{source}: no mpq:guest metadata: not a guest of mpqemu-mgmt", file=source,
                        key="metadata")
    data: dict[str, Any] = {
        "name": dom.name,
        "memory": f"{dom.memory}M" if dom.memory_unit in ("MiB", "M") else f"{dom.memory // 1024}M",
        "machine": dom.machine.split("-")[0] if dom.machine.startswith(("pc", "q35")) else dom.machine,
        "accel": "tcg" if dom.type == "qemu" else "kvm",
        "driver": dom.meta.driver,
        "vcpus": dom.vcpus,
    }
    if dom.meta.qemu_binary:
        data["qemu_binary"] = dom.meta.qemu_binary
    if dom.kernel:
        boot: dict[str, Any] = {"kernel": dom.kernel}
        if dom.initrd:
            boot["initrd"] = dom.initrd
        if dom.cmdline:
            boot["cmdline"] = dom.cmdline
        data["boot"] = boot
    devices = []
    for d in dom.meta.devices:
        dev: dict[str, Any] = {"id": d.id, "model": d.model, "backend": d.backend, "transport": d.transport,
                               "on_failure": d.on_failure, "readonly": d.readonly == "yes"}
        if d.remote:
            dev["remote"] = d.remote
        if d.backing:
            dev["backing"] = d.backing
        if d.props:
            dev["props"] = {p.name: p.value for p in d.props}
        devices.append(dev)
    data["device"] = devices
    return spec_from_dict(data, source)
