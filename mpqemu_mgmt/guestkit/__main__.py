"""``python -m mpqemu_mgmt.guestkit``: prepare the kit's cached parts and run a smoke boot.

Subcommands: ``kernel`` (fetch, print paths), ``qemu11`` (build/verify the sid root), ``kvm``
(probe whether Linux boots under KVM here), ``smoke`` (boot the test guest with a stock
``x-remote`` pci-testdev behind ``x-pci-proxy-dev`` and print what the guest saw and how long it
took). Prints data to stdout, diagnostics to stderr; exit 0 on success, 1 when the check failed,
4 when QEMU failed. It must not be imported by the package.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from mpqemu_mgmt.errors import MpqemuError
from mpqemu_mgmt.guestkit.boot import boot_script
from mpqemu_mgmt.guestkit.kernel import fetch_kernel
from mpqemu_mgmt.guestkit.pcilist import by_ids, parse_pci_listing
from mpqemu_mgmt.guestkit.qemu_argv import DEFAULT_QEMU, ProxyDevice
from mpqemu_mgmt.guestkit.scripts import guest_script


def _smoke() -> int:
    kernel = fetch_kernel()
    proxy_end, remote_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with tempfile.TemporaryDirectory(prefix="guestkit-smoke-") as workdir, proxy_end:
        log = Path(workdir) / "remote.log"
        with open(log, "wb") as log_file:
            remote = subprocess.Popen(
                [DEFAULT_QEMU, "-machine", "x-remote", "-nodefaults", "-display", "none",
                 "-device", "pci-testdev,id=t0",
                 "-object", f"x-remote-object,id=r0,devid=t0,fd={remote_end.fileno()}"],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                pass_fds=(remote_end.fileno(),),
            )
        remote_end.close()
        try:
            result = boot_script(kernel, guest_script("pci_list.sh"),
                                 proxies=[ProxyDevice("t0", proxy_end.fileno())], timeout=60)
        finally:
            proxy_end.close()  # the remote exits on EOF (protocol.md §3.7)
            with contextlib.suppress(subprocess.TimeoutExpired):
                remote.wait(5)
            if remote.poll() is None:
                remote.kill()
                remote.wait()
    found = by_ids(parse_pci_listing(result.transcript), 0x1B36, 0x0005)
    for dev in found:
        bars = ", ".join(f"BAR{b.index} {b.kind} {b.size} B" for b in dev.bars.values())
        print(f"guest sees {dev.bdf} {dev.ids}: {bars}")
    print(f"kernel {kernel.release}; boot to script completion {result.elapsed:.2f} s; "
          f"QEMU exited after {result.total:.2f} s")
    ok = len(found) == 1 and {b: (v.kind, v.size) for b, v in found[0].bars.items()} == {
        0: ("mem", 4096), 1: ("io", 256)}
    if not ok:
        print(result.transcript, file=sys.stderr)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpqemu_mgmt.guestkit", description=__doc__)
    parser.add_argument("command", choices=["kernel", "qemu11", "kvm", "smoke"])
    args = parser.parse_args(argv)
    try:
        if args.command == "kernel":
            kernel = fetch_kernel()
            print(f"{kernel.package} {kernel.release}")
            print(f"vmlinuz {kernel.vmlinuz}\nmodules {kernel.modules_dir}")
            return 0
        if args.command == "qemu11":
            from mpqemu_mgmt.guestkit.qemu11 import fetch_qemu11

            qemu = fetch_qemu11()
            has_client = "vfio-user-pci" in qemu.devices
            print(f"QEMU {qemu.version_text} in {qemu.root}; vfio-user-pci: {has_client}")
            print(" ".join(qemu.command()))
            return 0
        if args.command == "kvm":
            from mpqemu_mgmt.guestkit.kvm import kvm_can_boot_linux

            ok, reason = kvm_can_boot_linux()
            print(f"{'yes' if ok else 'no'}: {reason}")
            return 0 if ok else 1
        return _smoke()
    except MpqemuError as exc:
        print(f"{type(exc).__name__}: {exc.message}", file=sys.stderr)
        if os.environ.get("GUESTKIT_DEBUG"):
            print(exc.details, file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
