"""Fetch the Debian cloud kernel for the test guest and find its vmlinuz and modules.

IO shell: runs ``apt-cache depends`` to turn the meta package ``linux-image-cloud-amd64`` into the
real one (e.g. ``linux-image-6.1.0-56-cloud-amd64``), ``apt-get download`` and ``dpkg -x`` into the
cache once (:func:`mpqemu_mgmt.guestkit.cache.build_once`), then reads module files. The metadata
logic (compression, ``.modinfo``, load order) lives in the pure :mod:`.modinfo`. This module must
not build initramfs images or start QEMU.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from mpqemu_mgmt.errors import GuestKitError
from mpqemu_mgmt.guestkit import modinfo
from mpqemu_mgmt.guestkit.cache import build_once, cache_root

META_PACKAGE = "linux-image-cloud-amd64"
_REAL_PACKAGE_RE = re.compile(r"^\s*Depends:\s*(linux-image-[0-9][^\s:]*-cloud-amd64)\s*$", re.M)
_APT_TIMEOUT = 300.0


def parse_apt_depends(text: str) -> str | None:
    """The versioned ``linux-image-…-cloud-amd64`` named by ``apt-cache depends <meta>`` output."""
    found = _REAL_PACKAGE_RE.findall(text)
    return found[-1] if found else None


def resolve_package(meta: str = META_PACKAGE) -> str:
    """The real kernel package the meta package currently depends on (asks the local apt cache)."""
    try:
        out = subprocess.run(
            ["apt-cache", "depends", meta], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise GuestKitError(f"apt-cache depends {meta} failed: {exc}", package=meta) from exc
    package = parse_apt_depends(out)
    if package is None:
        raise GuestKitError("apt-cache names no versioned cloud kernel", package=meta, output=out[-500:])
    return package


def _run(argv: list[str], cwd: Path, package: str) -> None:
    proc = subprocess.run(argv, check=False, cwd=cwd, capture_output=True, text=True, timeout=_APT_TIMEOUT)
    if proc.returncode != 0:
        raise GuestKitError(
            f"{argv[0]} failed with status {proc.returncode}", package=package, stderr=proc.stderr[-2000:]
        )


def _download_and_extract(package: str, tmp: Path) -> None:
    tmp.mkdir()
    debs = tmp / "debs"
    debs.mkdir()
    # apt-get download writes into its cwd; as root it warns that _apt cannot reach the directory
    # and downloads unsandboxed, which is harmless here.
    _run(["apt-get", "download", "-q", package], debs, package)
    found = sorted(debs.glob("*.deb"))
    if len(found) != 1:
        raise GuestKitError("apt-get download produced no single .deb", package=package,
                            found=[p.name for p in found])
    _run(["dpkg", "-x", str(found[0]), str(tmp / "root")], tmp, package)
    found[0].unlink()
    debs.rmdir()


@dataclass(frozen=True)
class Kernel:
    """An extracted kernel package: ``root`` is the ``dpkg -x`` tree."""

    package: str
    root: Path
    release: str = field(init=False)

    def __post_init__(self) -> None:
        releases = sorted(p.name for p in (self.root / "lib" / "modules").iterdir() if p.is_dir())
        if len(releases) != 1:
            raise GuestKitError("expected one lib/modules/<release>", root=str(self.root), found=releases)
        object.__setattr__(self, "release", releases[0])

    @property
    def vmlinuz(self) -> Path:
        path = self.root / "boot" / f"vmlinuz-{self.release}"
        if not path.is_file():
            raise GuestKitError("no vmlinuz in the kernel package", path=str(path))
        return path

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.release

    @cached_property
    def module_files(self) -> dict[str, Path]:
        """Module name → file, for every loadable module the package ships."""
        table: dict[str, Path] = {}
        for dirpath, _dirs, files in os.walk(self.modules_dir / "kernel"):
            for name in files:
                if name.endswith(modinfo.MODULE_SUFFIXES):
                    table[modinfo.module_name(name)] = Path(dirpath) / name
        return table

    @cached_property
    def builtin(self) -> frozenset[str]:
        """Modules compiled into vmlinuz (``modules.builtin``): nothing to load for them."""
        path = self.modules_dir / "modules.builtin"
        text = path.read_text() if path.is_file() else ""
        return frozenset(modinfo.module_name(line.strip()) for line in text.splitlines() if line.strip())

    @cached_property
    def _modules_dep(self) -> dict[str, tuple[str, ...]] | None:
        path = self.modules_dir / "modules.dep"
        return modinfo.parse_modules_dep(path.read_text()) if path.is_file() else None

    def image(self, name: str) -> bytes:
        """The uncompressed ``.ko`` bytes of module ``name``."""
        try:
            path = self.module_files[modinfo.module_name(name)]
        except KeyError as exc:
            raise GuestKitError("no such module in the kernel package", module=name,
                                release=self.release) from exc
        return modinfo.decompress(path.name, path.read_bytes())

    def depends(self, name: str) -> tuple[str, ...]:
        """Direct dependencies: ``modules.dep`` when present, else the module's ``.modinfo``."""
        if self._modules_dep is not None and name in self._modules_dep:
            return self._modules_dep[name]
        return modinfo.depends(self.image(name))

    def load_order(self, wanted: list[str] | tuple[str, ...]) -> list[str]:
        """``wanted`` plus dependencies, dependencies first, built-ins dropped."""
        return modinfo.load_order(wanted, self.depends, self.builtin)


def fetch_kernel(package: str | None = None, cache: Path | None = None) -> Kernel:
    """The cached kernel for ``package`` (default: what the cloud meta package depends on now).

    Downloads and extracts it the first time, under a lock shared with concurrent callers. When apt
    cannot resolve the meta package, the newest kernel already in the cache is used.
    """
    base = (cache or cache_root()) / "kernel"
    cached = sorted(p.name for p in base.glob("linux-image-*") if p.is_dir()) if base.is_dir() else []
    if package is not None:
        wanted = package
        item = build_once(base / wanted, lambda tmp: _download_and_extract(wanted, tmp))
        return Kernel(wanted, item / "root")
    try:
        current = resolve_package()
        item = build_once(base / current, lambda tmp: _download_and_extract(current, tmp))
        return Kernel(current, item / "root")
    except GuestKitError:
        # No apt, stale lists or no mirror: an older kernel from the cache boots the guest just as well.
        if not cached:
            raise
        return Kernel(cached[-1], base / cached[-1] / "root")
