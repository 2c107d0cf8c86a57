"""Fixtures for real-guest tests, shared by every engineer's system tests.

* ``guest_kernel``  the cached Debian cloud kernel (downloaded once per cache; skips with the reason
  when apt cannot provide it).
* ``qemu72``        the system's qemu-system-x86_64 path (skips when missing).
* ``qemu11``        the QEMU 11.1 from the debootstrapped sid root (built once, ~40 s; skips with the
  reason when it cannot be built or verified).
* ``kvm_boot``      ``(ok, reason)`` from :func:`mpqemu_mgmt.guestkit.kvm.kvm_can_boot_linux`;
  ``require_kvm_boot`` skips with that reason unless a Linux guest boots under KVM here.
"""

from __future__ import annotations

import shutil

import pytest

from mpqemu_mgmt.errors import MpqemuError
from mpqemu_mgmt.guestkit.kernel import Kernel, fetch_kernel
from mpqemu_mgmt.guestkit.qemu11 import Qemu11, fetch_qemu11


@pytest.fixture(scope="session")
def guest_kernel() -> Kernel:
    try:
        return fetch_kernel()
    except MpqemuError as exc:
        pytest.skip(f"no test-guest kernel: {exc.message} {exc.details}")


@pytest.fixture(scope="session")
def qemu72() -> str:
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        pytest.skip("qemu-system-x86_64 (QEMU 7.2, apt qemu-system-x86) is not installed")
    return path


@pytest.fixture(scope="session")
def qemu11() -> Qemu11:
    if shutil.which("bwrap") is None or shutil.which("debootstrap") is None:
        pytest.skip("QEMU 11.1 needs bubblewrap and debootstrap (apt-get install bubblewrap debootstrap)")
    try:
        return fetch_qemu11()
    except MpqemuError as exc:
        pytest.skip(f"QEMU 11.1 root unavailable: {exc.message} {exc.details}")


@pytest.fixture(scope="session")
def kvm_boot() -> tuple[bool, str]:
    from mpqemu_mgmt.guestkit.kvm import kvm_can_boot_linux

    return kvm_can_boot_linux()


@pytest.fixture
def require_kvm_boot(kvm_boot: tuple[bool, str]) -> None:
    ok, reason = kvm_boot
    if not ok:
        pytest.skip(f"needs a Linux guest under KVM: {reason}")
