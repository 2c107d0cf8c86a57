"""Can a Linux guest boot under KVM on this host? One probe boot, remembered.

Interrupt delivery through ``x-pci-proxy-dev`` needs KVM irqfds (protocol.md §3.5), so tests of it
skip unless this says yes. On the team's Debian 12 hosts /dev/kvm exists but a Linux guest never
gets past early boot (nested KVM), which only a real boot reveals. The answer is cached in-process
and in the cache directory keyed by the host's boot id, so the probe runs once per host boot and
kernel. IO shell; it must not decide anything about the tests that use it.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

from mpqemu_mgmt.errors import MpqemuError
from mpqemu_mgmt.guestkit.boot import boot_script
from mpqemu_mgmt.guestkit.cache import cache_root, locked
from mpqemu_mgmt.guestkit.initramfs import GuestScript
from mpqemu_mgmt.guestkit.kernel import fetch_kernel

PROBE_TIMEOUT = 12.0  # TCG boots this guest in ~2 s; KVM that works is faster still
KVM_DEVICE = Path("/dev/kvm")


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def probe_kvm_boot(timeout: float = PROBE_TIMEOUT) -> tuple[bool, str]:
    """Boot the test guest once with ``-accel kvm``; no caching. Returns (ok, reason)."""
    if not KVM_DEVICE.exists():
        return False, f"{KVM_DEVICE} does not exist"
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return False, f"{KVM_DEVICE} is not readable and writable by uid {os.getuid()}"
    try:
        kernel = fetch_kernel()
        result = boot_script(kernel, GuestScript("exit 0\n", name="kvm_probe.sh"), accel="kvm",
                             timeout=timeout)
    except MpqemuError as exc:
        tail = str(exc.details.get("transcript", "")).strip().splitlines()[-1:]
        stderr = str(exc.details.get("stderr", "")).strip().splitlines()[-1:]
        return False, (f"a Linux guest did not boot under KVM here ({exc.message}); "
                       f"last console line: {tail[0] if tail else '(none)'}; "
                       f"QEMU stderr: {stderr[0] if stderr else '(none)'}")
    return True, f"a Linux guest booted under KVM in {result.elapsed:.1f} s"


@lru_cache(maxsize=1)
def kvm_can_boot_linux() -> tuple[bool, str]:
    """(True, …) when a Linux guest boots to its script under KVM here, else (False, reason)."""
    if not KVM_DEVICE.exists():
        return False, f"{KVM_DEVICE} does not exist"
    record = cache_root() / f"kvm-probe-{_boot_id()}.json"
    with locked(record):  # concurrent test runs wait for one probe instead of each booting
        try:
            saved = json.loads(record.read_text())
            return bool(saved["ok"]), str(saved["reason"]) + " (probed earlier this host boot)"
        except (OSError, ValueError, KeyError):
            pass
        ok, reason = probe_kvm_boot()
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps({"ok": ok, "reason": reason}))
        os.replace(tmp, record)
    return ok, reason
