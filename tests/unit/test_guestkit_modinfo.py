"""Pure kernel-module metadata: names, decompression, .modinfo from ELF, load order, apt output."""

from __future__ import annotations

import lzma
import struct

import pytest

from mpqemu_mgmt.errors import GuestKitError
from mpqemu_mgmt.guestkit import modinfo
from mpqemu_mgmt.guestkit.initramfs import elf_interpreter
from mpqemu_mgmt.guestkit.kernel import parse_apt_depends


def make_elf(sections: dict[str, bytes]) -> bytes:
    """A minimal little-endian ELF64 relocatable with the given sections (plus .shstrtab)."""
    names = b"\0"
    offsets = {}
    for name in [*sections, ".shstrtab"]:
        offsets[name] = len(names)
        names += name.encode() + b"\0"
    body = b""
    placed = {}
    for name, data in [*sections.items(), (".shstrtab", names)]:
        placed[name] = 64 + len(body)
        body += data
    shoff = 64 + len(body)
    count = len(sections) + 2  # null section first
    ehdr = bytearray(64)
    ehdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", ehdr, 0x28, shoff)
    struct.pack_into("<HHH", ehdr, 0x3A, 64, count, count - 1)
    shdrs = bytes(64)
    for name, data in [*sections.items(), (".shstrtab", names)]:
        sh = bytearray(64)
        struct.pack_into("<I", sh, 0, offsets[name])
        struct.pack_into("<QQ", sh, 0x18, placed[name], len(data))
        shdrs += bytes(sh)
    return bytes(ehdr) + body + shdrs


MODINFO = b"license=GPL\0depends=virtio_ring,virtio-pci-modern-dev\0name=virtio_pci\0vermagic=6.1.0\0"


@pytest.mark.parametrize(
    ("path", "name"),
    [("kernel/drivers/virtio/virtio_pci.ko", "virtio_pci"), ("x/virtio_blk.ko.xz", "virtio_blk"),
     ("a-b.ko.zst", "a_b"), ("uio.ko.gz", "uio")],
)
def test_module_name(path: str, name: str) -> None:
    assert modinfo.module_name(path) == name


def test_modinfo_and_depends_from_elf() -> None:
    blob = make_elf({".text": b"\x90" * 7, ".modinfo": MODINFO})
    info = modinfo.modinfo(blob)
    assert info["name"] == "virtio_pci" and info["license"] == "GPL"
    assert modinfo.depends(blob) == ("virtio_ring", "virtio_pci_modern_dev")


def test_empty_depends() -> None:
    assert modinfo.depends(make_elf({".modinfo": b"depends=\0name=uio\0"})) == ()


def test_elf_errors() -> None:
    with pytest.raises(GuestKitError, match="ELF64"):
        modinfo.elf_section(b"\x7fELF\x01\x01" + bytes(100), ".modinfo")
    with pytest.raises(GuestKitError, match="not found"):
        modinfo.elf_section(make_elf({".text": b""}), ".modinfo")
    with pytest.raises(GuestKitError, match="truncated"):
        modinfo.elf_section(make_elf({".modinfo": MODINFO})[:80], ".modinfo")


def test_decompress() -> None:
    raw = make_elf({".modinfo": MODINFO})
    assert modinfo.decompress("m.ko", raw) == raw
    assert modinfo.decompress("m.ko.xz", lzma.compress(raw)) == raw
    with pytest.raises(GuestKitError):
        modinfo.decompress("m.o", raw)


DEPS = {
    "virtio_pci": ("virtio_ring", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio"),
    "virtio": ("virtio_ring",),
    "virtio_ring": (),
    "virtio_pci_modern_dev": (),
    "virtio_pci_legacy_dev": (),
    "virtio_blk": ("virtio", "virtio_ring"),
    "uio_pci_generic": ("uio",),
    "uio": (),
}


def deps_of(name: str) -> tuple[str, ...]:
    if name not in DEPS:
        raise GuestKitError("unknown", module=name)
    return DEPS[name]


def test_load_order_puts_dependencies_first_once() -> None:
    order = modinfo.load_order(["virtio_blk", "virtio_pci", "uio_pci_generic"], deps_of)
    assert sorted(order) == sorted(DEPS)
    for name, deps in DEPS.items():
        for dep in deps:
            assert order.index(dep) < order.index(name)


def test_load_order_skips_builtins() -> None:
    order = modinfo.load_order(["virtio_blk"], deps_of, builtin=frozenset({"virtio", "virtio_ring"}))
    assert order == ["virtio_blk"]


def test_load_order_cycle_and_unknown() -> None:
    cyclic = {"a": ("b",), "b": ("a",)}
    with pytest.raises(GuestKitError, match="cycle"):
        modinfo.load_order(["a"], lambda n: cyclic[n])
    with pytest.raises(GuestKitError):
        modinfo.load_order(["nosuch"], deps_of)


def test_parse_modules_dep() -> None:
    text = ("kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n"
            "kernel/drivers/virtio/virtio_ring.ko:\n")
    assert modinfo.parse_modules_dep(text) == {"virtio": ("virtio_ring",), "virtio_ring": ()}


def test_parse_apt_depends() -> None:
    out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n"
    assert parse_apt_depends(out) == "linux-image-6.1.0-56-cloud-amd64"
    assert parse_apt_depends("linux-image-cloud-amd64\n") is None


def test_elf_interpreter() -> None:
    def exe(interp: bytes | None) -> bytes:
        ehdr = bytearray(64)
        ehdr[:6] = b"\x7fELF\x02\x01"
        struct.pack_into("<Q", ehdr, 0x20, 64)
        struct.pack_into("<HH", ehdr, 0x36, 56, 1)
        ph = bytearray(56)
        if interp is not None:
            struct.pack_into("<I", ph, 0, 3)
            struct.pack_into("<QQQQ", ph, 8, 120, 0, 0, len(interp))
        return bytes(ehdr) + bytes(ph) + (interp or b"")

    assert elf_interpreter(exe(b"/lib64/ld-linux-x86-64.so.2\0")) == "/lib64/ld-linux-x86-64.so.2"
    assert elf_interpreter(exe(None)) is None
