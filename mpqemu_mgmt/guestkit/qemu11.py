"""QEMU 11.1 next to the system's 7.2: a debootstrapped Debian sid root, run through bubblewrap.

Debian sid carries QEMU 11.1 with the ``vfio-user-pci`` client and still ``x-pci-proxy-dev``. The
root is built once into the cache (``debootstrap --variant=minbase --include=qemu-system-x86 sid``,
about 35 s and 410 MB) under the cache lock and published by rename. Its ``qemu-system-x86_64`` runs
from the host as ``bwrap --bind ROOT / --dev-bind /dev /dev --proc /proc … -- qemu-system-x86_64``;
bwrap keeps inherited fds under their numbers (confinement.md §5.3), so proxy sockets pass through.
IO shell; it must not know what the QEMU it runs is used for.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mpqemu_mgmt.errors import GuestKitError
from mpqemu_mgmt.guestkit.cache import build_once, cache_root

SUITE = "sid"
MIRROR = "http://deb.debian.org/debian"
ROOT_NAME = "qemu-sid-root"
BINARY = "qemu-system-x86_64"
REQUIRED_DEVICES = ("vfio-user-pci", "x-pci-proxy-dev")
_DEBOOTSTRAP_TIMEOUT = 1800.0
_VERSION_RE = re.compile(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?")


def parse_version(text: str) -> tuple[int, int, int] | None:
    """``QEMU emulator version 11.1.3 (Debian …)`` → (11, 1, 3). Pure."""
    match = _VERSION_RE.search(text)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def parse_device_names(text: str) -> frozenset[str]:
    """Device names from ``-device help`` (lines ``name "edu", bus PCI``). Pure."""
    return frozenset(re.findall(r'^name "([^"]+)"', text, re.M))


def bwrap_prefix(
    root: Path, binds: Sequence[Path | str] = (), ro_binds: Sequence[Path | str] = ()
) -> list[str]:
    """The argv prefix that runs a program of ``root`` on this host's kernel. Pure.

    ``binds`` / ``ro_binds`` are host directories shown at the same path inside (sockets,
    kernels, images). /tmp is a private tmpfs unless a bind names a path under it.
    """
    argv = ["bwrap", "--bind", str(root), "/", "--dev-bind", "/dev", "/dev", "--proc", "/proc",
            "--tmpfs", "/tmp"]
    for path in ro_binds:
        argv += ["--ro-bind", str(path), str(path)]
    for path in binds:
        argv += ["--bind", str(path), str(path)]
    return [*argv, "--die-with-parent", "--"]


def _debootstrap(tmp: Path) -> None:
    if shutil.which("debootstrap") is None:
        raise GuestKitError("debootstrap is not installed (apt-get install debootstrap)")
    proc = subprocess.run(
        ["debootstrap", "--variant=minbase", "--include=qemu-system-x86", SUITE, str(tmp), MIRROR],
        check=False, capture_output=True, text=True, timeout=_DEBOOTSTRAP_TIMEOUT,
    )
    if proc.returncode != 0:
        raise GuestKitError(f"debootstrap {SUITE} failed with status {proc.returncode}",
                            output=(proc.stdout + proc.stderr)[-3000:])
    # The package cache is not needed to run QEMU; dropping it saves ~100 MB.
    for deb in (tmp / "var" / "cache" / "apt" / "archives").glob("*.deb"):
        deb.unlink()


@dataclass(frozen=True)
class Qemu11:
    """A verified QEMU from the sid root; ``version`` as (major, minor, micro)."""

    root: Path
    version: tuple[int, int, int]
    devices: frozenset[str]
    binary: str = BINARY

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    def argv_prefix(self, binds: Sequence[Path | str] = (), ro_binds: Sequence[Path | str] = ()) -> list[str]:
        """The prefix for :func:`mpqemu_mgmt.guestkit.boot.boot_script`'s ``qemu_argv_prefix``.

        The kit's cache directory (kernels, initramfs images) is always visible read-only.
        """
        return bwrap_prefix(self.root, binds, (cache_root(), *ro_binds))

    def command(self, binds: Sequence[Path | str] = (), ro_binds: Sequence[Path | str] = ()) -> list[str]:
        """Prefix plus binary: a full command to which QEMU arguments can be appended."""
        return [*self.argv_prefix(binds, ro_binds), self.binary]

    def write_wrapper(self, path: Path, binds: Sequence[Path | str] = ()) -> Path:
        """An executable script at ``path`` that runs this QEMU with its arguments: what a guest
        spec's ``qemu_binary`` names so that a guest (and the service) uses QEMU 11.1."""
        argv = " ".join(shlex.quote(a) for a in self.command(binds))
        path.write_text(f'#!/bin/sh\nexec {argv} "$@"\n')
        path.chmod(0o755)
        return path


def _run_inside(root: Path, args: Sequence[str]) -> str:
    if shutil.which("bwrap") is None:
        raise GuestKitError("bubblewrap is not installed (apt-get install bubblewrap)")
    proc = subprocess.run([*bwrap_prefix(root), BINARY, *args], check=False, capture_output=True,
                          text=True, timeout=60)
    if proc.returncode != 0:
        raise GuestKitError(f"{BINARY} {' '.join(args)} failed inside the sid root",
                            status=proc.returncode, stderr=proc.stderr[-2000:])
    return proc.stdout


def fetch_qemu11(cache: Path | None = None) -> Qemu11:
    """The cached sid root (built on first use), verified to run a QEMU ≥ 11 with vfio-user-pci."""
    root = build_once((cache or cache_root()) / ROOT_NAME, _debootstrap)
    version = parse_version(_run_inside(root, ["--version"]))
    if version is None or version[0] < 11:
        raise GuestKitError("the sid root's QEMU is not 11.x or later", root=str(root), version=version)
    devices = parse_device_names(_run_inside(root, ["-device", "help"]))
    missing = [d for d in REQUIRED_DEVICES if d not in devices]
    if missing:
        raise GuestKitError("the sid root's QEMU lacks required devices", missing=missing,
                            version=version)
    return Qemu11(root, version, devices)
