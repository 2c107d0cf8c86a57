"""The libvirt domain XML as typed objects, declared field by field (the ONLY module using lxml).

In the manner of virtinst's XMLBuilder (virtinst/xmlbuilder.py): each element class declares its
fields as ``(attribute, xpath, kind)`` in document order, and the same declarations both write
(``to_xml``) and read (``parse``), so parse → write round-trips. Child lists (controllers,
metadata devices) are declared the same way. Our own state lives in ``<metadata>`` under the
``mpq`` namespace (Nova keeps its instance data under its own namespace the same way), which libvirt
keeps verbatim and the libvirt hook reads from stdin. No ``<qemu:commandline>`` is ever written
(it would taint the domain ``custom-argv``). Must not decide values: that is designer.py's job.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Final, Literal, Self, cast

from lxml import etree

from mpqemu_mgmt.errors import SpecError

MPQ_NS: Final = "https://mpqemu-mgmt.example.org/xmlns/libvirt/guest/1"
NSMAP: Final = {"mpq": MPQ_NS}
Kind = Literal["str", "int", "flag", "text"]


def _clark(segment: str) -> str:
    prefix, sep, local = segment.partition(":")
    return f"{{{NSMAP[prefix]}}}{local}" if sep else segment


@dataclass(frozen=True)
class F:
    """One declared field: dataclass attribute ← xpath (``a/b``, ``a/@x``; ``.`` is the element)."""

    attr: str
    xpath: str
    kind: Kind = "str"


def _split(xpath: str) -> tuple[list[str], str | None]:
    parts = [p for p in xpath.split("/") if p and p != "."]
    if parts and parts[-1].startswith("@"):
        return parts[:-1], parts[-1][1:]
    return parts, None


def _find(el: etree._Element, path: list[str]) -> etree._Element | None:
    for seg in path:
        child = el.find(_clark(seg))
        if child is None:
            return None
        el = child
    return el


def _make(el: etree._Element, path: list[str]) -> etree._Element:
    for seg in path:
        child = el.find(_clark(seg))
        el = child if child is not None else etree.SubElement(el, _clark(seg), nsmap=None)
    return el


class Node:
    """Base of declared elements: subclasses are dataclasses with TAG and FIELDS (and CHILDREN)."""

    TAG: ClassVar[str]
    FIELDS: ClassVar[tuple[F, ...]] = ()
    #: (attribute, container xpath ("" = this element), element class), written after FIELDS.
    CHILDREN: ClassVar[tuple[tuple[str, str, type[Node]], ...]] = ()

    def to_element(self, parent: etree._Element | None = None) -> etree._Element:
        tag = _clark(self.TAG)
        el = etree.Element(tag, nsmap=NSMAP if self.TAG.startswith("mpq:") else None) if parent is None \
            else etree.SubElement(parent, tag)
        for f in self.FIELDS:
            value = getattr(self, f.attr)
            if value is None or (f.kind == "flag" and not value):
                continue
            path, attr = _split(f.xpath)
            target = _make(el, path)
            if f.kind == "flag":
                continue
            if attr is None:
                target.text = str(value)
            else:
                target.set(attr, str(value))
        for attr_name, container, cls in self.CHILDREN:
            items = cast(list[Node], getattr(self, attr_name))
            if not items:
                continue
            holder = _make(el, _split(container)[0])
            for item in items:
                assert isinstance(item, cls)
                item.to_element(holder)
        return el

    @classmethod
    def from_element(cls, el: etree._Element) -> Self:
        values: dict[str, Any] = {}
        for f in cls.FIELDS:
            path, attr = _split(f.xpath)
            target = _find(el, path)
            if f.kind == "flag":
                values[f.attr] = target is not None
                continue
            raw = None if target is None else (target.text if attr is None else target.get(attr))
            if raw is None:
                continue
            values[f.attr] = int(raw, 0) if f.kind == "int" else raw
        for attr_name, container, child_cls in cls.CHILDREN:
            holder = _find(el, _split(container)[0])
            tag = _clark(child_cls.TAG)
            values[attr_name] = [] if holder is None else [
                child_cls.from_element(c) for c in holder if c.tag == tag]
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class PciAddressEl(Node):
    TAG: ClassVar[str] = "address"
    FIELDS: ClassVar[tuple[F, ...]] = (
        F("type", "@type"), F("domain", "@domain"), F("bus", "@bus"), F("slot", "@slot"),
        F("function", "@function"),
    )
    type: str = "pci"
    domain: str = "0x0000"
    bus: str = "0x00"
    slot: str = "0x00"
    function: str = "0x0"


@dataclass
class Controller(Node):
    TAG: ClassVar[str] = "controller"
    FIELDS: ClassVar[tuple[F, ...]] = (
        F("type", "@type"), F("index", "@index", "int"), F("model", "@model"),
        F("chassis", "target/@chassis", "int"), F("port", "target/@port"),
        F("addr_bus", "address/@bus"), F("addr_slot", "address/@slot"),
    )
    type: str = "pci"
    index: int = 0
    model: str | None = None
    chassis: int | None = None
    port: str | None = None
    addr_bus: str | None = None
    addr_slot: str | None = None

    def to_element(self, parent: etree._Element | None = None) -> etree._Element:
        el = super().to_element(parent)
        addr = el.find("address")
        if addr is not None:
            # libvirt's schema wants the full PCI address, in this attribute order.
            for key, value in (("type", "pci"), ("domain", "0x0000")):
                addr.set(key, value)
            bus, slot = addr.get("bus"), addr.get("slot")
            for key in ("bus", "slot"):
                del addr.attrib[key]
            addr.set("bus", bus or "0x00")
            addr.set("slot", slot or "0x00")
            addr.set("function", "0x0")
        return el


@dataclass
class MetaProp(Node):
    TAG: ClassVar[str] = "mpq:prop"
    FIELDS: ClassVar[tuple[F, ...]] = (F("name", "@name"), F("value", "@value"))
    name: str = ""
    value: str = ""


@dataclass
class MetaDevice(Node):
    """One remote device in our ``<metadata>``: everything needed to (re)build its remote."""

    TAG: ClassVar[str] = "mpq:device"
    FIELDS: ClassVar[tuple[F, ...]] = (
        F("id", "@id"), F("model", "@model"), F("backend", "@backend"), F("transport", "@transport"),
        F("on_failure", "@on_failure"), F("remote", "@remote"), F("readonly", "@readonly"),
        F("bus", "@bus"), F("slot", "@slot"), F("backing", "mpq:backing"),
    )
    CHILDREN: ClassVar[tuple[tuple[str, str, type[Node]], ...]] = (("props", "", MetaProp),)
    id: str = ""
    model: str = ""
    backend: str = "builtin"
    transport: str = "mpqemu"
    on_failure: str = "replug"
    remote: str | None = None
    readonly: str = "no"
    bus: str = ""
    slot: str = ""
    backing: str | None = None
    props: list[MetaProp] = field(default_factory=list)


@dataclass
class MetaGuest(Node):
    TAG: ClassVar[str] = "mpq:guest"
    FIELDS: ClassVar[tuple[F, ...]] = (
        F("version", "@version"), F("driver", "@driver"), F("state_dir", "mpq:state-dir"),
        F("qemu_binary", "mpq:qemu-binary"),
    )
    CHILDREN: ClassVar[tuple[tuple[str, str, type[Node]], ...]] = (("devices", "mpq:devices", MetaDevice),)
    version: str = "1"
    driver: str = "libvirt"
    state_dir: str | None = None
    qemu_binary: str | None = None
    devices: list[MetaDevice] = field(default_factory=list)


@dataclass
class Domain(Node):
    TAG: ClassVar[str] = "domain"
    # Document order follows libvirt's own XMLDesc output so diffs against it stay small;
    # <metadata> goes right after <name>/<uuid> (see to_element).
    FIELDS: ClassVar[tuple[F, ...]] = (
        F("type", "@type"),
        F("name", "name"),
        F("uuid", "uuid"),
        F("memory_unit", "memory/@unit"), F("memory", "memory", "int"),
        F("current_memory_unit", "currentMemory/@unit"), F("current_memory", "currentMemory", "int"),
        F("memfd", "memoryBacking/source/@type"), F("mem_access", "memoryBacking/access/@mode"),
        F("vcpus", "vcpu", "int"),
        F("arch", "os/type/@arch"), F("machine", "os/type/@machine"), F("os_type", "os/type"),
        F("kernel", "os/kernel"), F("initrd", "os/initrd"), F("cmdline", "os/cmdline"),
        F("acpi", "features/acpi", "flag"),
        F("on_poweroff", "on_poweroff"), F("on_reboot", "on_reboot"), F("on_crash", "on_crash"),
        F("emulator", "devices/emulator"),
    )
    type: str = "qemu"
    name: str = ""
    uuid: str | None = None
    meta: MetaGuest | None = None
    memory_unit: str = "MiB"
    memory: int = 256
    current_memory_unit: str = "MiB"
    current_memory: int = 256
    memfd: str | None = "memfd"
    mem_access: str | None = "shared"
    vcpus: int = 1
    arch: str = "x86_64"
    machine: str = "pc"
    os_type: str = "hvm"
    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    acpi: bool = True
    on_poweroff: str = "destroy"
    on_reboot: str = "restart"
    on_crash: str = "destroy"
    emulator: str | None = None
    controllers: list[Controller] = field(default_factory=list)
    console_path: str | None = None

    def to_element(self, parent: etree._Element | None = None) -> etree._Element:
        el = super().to_element(parent)
        if self.meta is not None:
            metadata = etree.Element("metadata")
            metadata.append(self.meta.to_element())
            head = [c for c in el if c.tag in ("name", "uuid")]
            el.insert(el.index(head[-1]) + 1 if head else 0, metadata)
        devices = el.find("devices")
        assert devices is not None
        for ctl in self.controllers:
            ctl.to_element(devices)
        if self.console_path is not None:
            serial = etree.SubElement(devices, "serial", type="file")
            etree.SubElement(serial, "source", path=self.console_path)
            etree.SubElement(serial, "target", port="0")
        # Nothing libvirt would add by default on its own: no USB, no balloon, no graphics.
        etree.SubElement(devices, "memballoon", model="none")
        return el

    def to_xml(self) -> str:
        return etree.tostring(self.to_element(), pretty_print=True, encoding="unicode")

    @classmethod
    def from_element(cls, el: etree._Element) -> Self:
        dom = super().from_element(el)
        meta_el = el.find(f"metadata/{_clark('mpq:guest')}")
        dom.meta = MetaGuest.from_element(meta_el) if meta_el is not None else None
        devices = el.find("devices")
        dom.controllers = [] if devices is None else [
            Controller.from_element(c) for c in devices.findall("controller")]
        path = None if devices is None else devices.find("serial[@type='file']/source")
        dom.console_path = None if path is None else path.get("path")
        return dom

    @classmethod
    def parse(cls, text: str, source: str = "<xml>") -> Domain:
        try:
            root = etree.fromstring(text.encode(), parser=etree.XMLParser(remove_blank_text=True))
        except etree.XMLSyntaxError as exc:
            raise SpecError(f"{source}: not well-formed XML: {exc}", file=source, key="") from exc
        if root.tag != "domain":
            raise SpecError(f"{source}: root element is <{root.tag}>, not <domain>", file=source, key="")
        return cls.from_element(root)
