"""Kernel module metadata, pure: decompress a module image, read its ``.modinfo``, order a set.

Debian's kernel package carries no ``modules.dep`` (``depmod`` writes it in the postinst, which
``dpkg -x`` does not run), so dependencies are read where depmod reads them: the ``depends=`` string
in each module's ``.modinfo`` ELF section (kmod ``libkmod-elf.c``, ``kmod_elf_get_strings``). A
``modules.dep`` is honoured when one exists.

Pure: bytes and strings in, data out. It must not open files or run tools.
"""

from __future__ import annotations

import lzma
import struct
from collections.abc import Callable, Iterable, Mapping

from mpqemu_mgmt.errors import GuestKitError

_ELF_MAGIC = b"\x7fELF"
_ELFCLASS64 = 2
_ELFDATA2LSB = 1
MODULE_SUFFIXES = (".ko", ".ko.xz", ".ko.zst", ".ko.gz")


def module_name(filename: str) -> str:
    """``drivers/virtio/virtio_pci.ko.xz`` → ``virtio_pci``; dashes become underscores as in kmod."""
    base = filename.rsplit("/", 1)[-1]
    for suffix in MODULE_SUFFIXES:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    return base.replace("-", "_")


def decompress(filename: str, blob: bytes) -> bytes:
    """Return the raw ELF of a module file, whatever compression its name says.

    busybox's ``insmod`` (modutils/modutils.c ``bb_init_module``) tries finit_module(2), then
    mmaps a file only if it starts with the ELF magic (``try_to_mmap_module``), and only then falls
    back to a decompressing read whose formats depend on busybox's SEAMLESS_* build options; zstd is
    not among them in 1.35. Giving the guest plain ``.ko`` files removes the dependence on both the
    guest kernel's and busybox's decompression support. (Debian 12's cloud kernel ships plain ``.ko``.)
    """
    if filename.endswith(".ko"):
        return blob
    if filename.endswith(".ko.xz"):
        return lzma.decompress(blob)
    if filename.endswith(".ko.gz"):
        import gzip

        return gzip.decompress(blob)
    if filename.endswith(".ko.zst"):
        try:
            import zstandard  # type: ignore[import-not-found]
        except ImportError as exc:
            raise GuestKitError(
                "module is zstd-compressed and the zstandard package is not installed", module=filename
            ) from exc
        return bytes(zstandard.ZstdDecompressor().decompress(blob, max_output_size=64 << 20))
    raise GuestKitError("not a kernel module file name", module=filename)


def elf_section(blob: bytes, wanted: str) -> bytes:
    """The contents of section ``wanted`` of a little-endian ELF64 relocatable (a ``.ko``)."""
    if blob[:4] != _ELF_MAGIC or blob[4] != _ELFCLASS64 or blob[5] != _ELFDATA2LSB:
        raise GuestKitError("not a little-endian ELF64 object")
    try:
        # Elf64_Ehdr: e_shoff at 0x28, e_shentsize/e_shnum/e_shstrndx at 0x3a/0x3c/0x3e.
        (shoff,) = struct.unpack_from("<Q", blob, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", blob, 0x3A)

        def header(i: int) -> tuple[int, int, int]:
            # Elf64_Shdr: sh_name u32 at 0, sh_offset u64 at 0x18, sh_size u64 at 0x20.
            base = shoff + i * shentsize
            (name,) = struct.unpack_from("<I", blob, base)
            offset, size = struct.unpack_from("<QQ", blob, base + 0x18)
            return name, offset, size

        _, str_off, str_size = header(shstrndx)
        names = blob[str_off:str_off + str_size]
        for i in range(shnum):
            name_off, offset, size = header(i)
            end = names.find(b"\0", name_off)
            if names[name_off:end].decode() == wanted:
                if offset + size > len(blob):
                    raise GuestKitError("ELF section runs past the end of the file", section=wanted)
                return blob[offset:offset + size]
    except struct.error as exc:
        raise GuestKitError("truncated ELF headers") from exc
    raise GuestKitError("ELF section not found", section=wanted)


def modinfo(blob: bytes) -> dict[str, str]:
    """The ``key=value`` strings of a module's ``.modinfo`` (the last value wins for repeats)."""
    info: dict[str, str] = {}
    for item in elf_section(blob, ".modinfo").split(b"\0"):
        key, sep, value = item.decode(errors="replace").partition("=")
        if sep:
            info[key] = value
    return info


def depends(blob: bytes) -> tuple[str, ...]:
    """The modules this one needs loaded first, from ``depends=`` (comma separated, may be empty)."""
    value = modinfo(blob).get("depends", "")
    return tuple(module_name(d) for d in value.split(",") if d)


def parse_modules_dep(text: str) -> dict[str, tuple[str, ...]]:
    """``modules.dep`` lines ``path: dep-path dep-path`` → ``{name: (dep names…)}``."""
    table: dict[str, tuple[str, ...]] = {}
    for line in text.splitlines():
        path, sep, rest = line.partition(":")
        if sep:
            table[module_name(path)] = tuple(module_name(p) for p in rest.split())
    return table


def load_order(
    wanted: Iterable[str],
    deps_of: Callable[[str], tuple[str, ...]],
    builtin: Mapping[str, object] | frozenset[str] = frozenset(),
) -> list[str]:
    """Every module needed for ``wanted``, dependencies first; built-in ones are left out.

    ``deps_of(name)`` gives a module's direct dependencies (raising :class:`GuestKitError` for an
    unknown module). A cycle is an error, as it is for modprobe.
    """
    order: list[str] = []
    state: dict[str, str] = {}  # name -> "visiting" | "done"

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = module_name(name)
        if name in builtin or state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise GuestKitError("module dependency cycle", cycle=[*chain, name])
        state[name] = "visiting"
        for dep in deps_of(name):
            visit(dep, (*chain, name))
        state[name] = "done"
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order
