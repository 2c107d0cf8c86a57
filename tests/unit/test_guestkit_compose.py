"""Pure composition: the initramfs layout and /init, QEMU argv, verdict parsing, sysfs listing,
and the QEMU 11.1 helpers' parsers."""

from __future__ import annotations

import re
import stat
import subprocess
from pathlib import Path

import pytest

from mpqemu_mgmt.errors import GuestKitError
from mpqemu_mgmt.guestkit.cpio import read_newc, write_newc
from mpqemu_mgmt.guestkit.initramfs import MARKER, GuestScript, initramfs_entries, render_init
from mpqemu_mgmt.guestkit.pcilist import IORESOURCE_IO, IORESOURCE_MEM, by_ids, parse_pci_listing
from mpqemu_mgmt.guestkit.qemu11 import bwrap_prefix, parse_device_names, parse_version
from mpqemu_mgmt.guestkit.qemu_argv import BootSpec, ProxyDevice, parse_status, qemu_argv
from mpqemu_mgmt.guestkit.scripts import EDU_APPEND, EDU_DMA_BASE, script_text, verdicts
from mpqemu_mgmt.guestkit.watch_guest import EDU, parse_pci_sets, watch_script

SCRIPT = GuestScript("echo hi\n", name="check.sh", env={"A_B": "x y'z"}, files={"data.bin": b"\0\1"})


def test_layout_parents_first_console_and_executables() -> None:
    entries = initramfs_entries(b"BUSYBOX", ["bin/sh", "usr/bin/awk", "sbin/insmod", "bin/sh", "etc/x"],
                                [("uio", b"U"), ("uio_pci_generic", b"G")], SCRIPT)
    by_name = {e.name: e for e in entries}
    seen: set[str] = set()
    for entry in entries:
        parent = entry.name.rsplit("/", 1)[0] if "/" in entry.name else ""
        assert parent == "" or parent in seen, f"{entry.name} before its directory"
        seen.add(entry.name)
    assert len(seen) == len(entries)  # no duplicates (bin/sh was listed twice)
    console = by_name["dev/console"]
    assert stat.S_ISCHR(console.mode) and (console.rdevmajor, console.rdevminor) == (5, 1)
    assert by_name["bin/sh"].data == b"/bin/busybox" and stat.S_ISLNK(by_name["bin/sh"].mode)
    assert "etc/x" not in by_name  # applets only go into directories the image has
    for name in ("init", "bin/busybox", "guest/check.sh"):
        assert by_name[name].mode & 0o111
    assert by_name["lib/modules/guestkit/uio_pci_generic.ko"].data == b"G"
    assert by_name["guest/data.bin"].data == b"\0\1"
    # and it survives the archive
    assert list(read_newc(write_newc(entries))) == entries


def test_init_loads_modules_in_order_runs_script_and_prints_marker() -> None:
    init = render_init(["uio", "uio_pci_generic"], SCRIPT)
    assert init.startswith("#!/bin/sh\n")
    assert init.index("insmod /lib/modules/guestkit/uio.ko") < init.index("uio_pci_generic.ko")
    assert "export A_B='x y'\"'\"'z'" in init
    assert "sh /guest/check.sh" in init
    assert init.index("sh /guest/check.sh") < init.index(f'echo "{MARKER} $nonce rc=$rc"')
    assert init.index(MARKER) < init.index("poweroff -f")
    for mount in ("proc /proc", "sysfs /sys", "devtmpfs /dev"):
        assert mount in init


@pytest.mark.parametrize("bad", [GuestScript("x", name="../x.sh"), GuestScript("x", env={"A;B": "1"}),
                                 GuestScript("x", env={"": "1"})])
def test_unsafe_names_refused(bad: GuestScript) -> None:
    with pytest.raises(GuestKitError):
        render_init([], bad)


def test_bad_guest_file_names_refused() -> None:
    with pytest.raises(GuestKitError):
        initramfs_entries(b"", [], [], GuestScript("x", files={"a/b": b""}))


def spec(**kw: object) -> BootSpec:
    return BootSpec(kernel=Path("/k/vmlinuz"), initrd=Path("/k/initrd.cpio"), **kw)  # type: ignore[arg-type]


def test_argv_shape() -> None:
    argv = qemu_argv(spec(memory_mib=128, proxies=[ProxyDevice("t0", 7), ProxyDevice("e0", 9)],
                          devices=["edu,id=x"], append=["iomem=relaxed"], qmp_socket=Path("/r/q.sock"),
                          qemu_argv_prefix=("bwrap", "--")), "abc123")
    assert argv[:3] == ["bwrap", "--", "qemu-system-x86_64"]
    joined = " ".join(argv)
    assert "-object memory-backend-memfd,id=mem,size=128M,share=on" in joined
    assert "-machine pc,memory-backend=mem" in joined and "-m 128M" in joined
    assert "-accel tcg" in joined and "-nodefaults" in argv and "-no-reboot" in argv
    assert "-device x-pci-proxy-dev,id=t0,fd=7 -device x-pci-proxy-dev,id=e0,fd=9" in joined
    assert "-device edu,id=x" in joined
    assert "-qmp unix:/r/q.sock,server=on,wait=off" in joined
    append = argv[argv.index("-append") + 1]
    assert append.split()[:3] == ["console=ttyS0", "quiet", "panic=-1"]
    assert append.split()[-2:] == ["iomem=relaxed", "guestkit.nonce=abc123"]
    assert spec(proxies=[ProxyDevice("t0", 7)]).pass_fds == (7,)


@pytest.mark.parametrize("bad", [{"memory_mib": 0}, {"proxies": [ProxyDevice("t 0", 3)]},
                                 {"proxies": [ProxyDevice("t0", -1)]}])
def test_argv_refusals(bad: dict[str, object]) -> None:
    with pytest.raises(GuestKitError):
        qemu_argv(spec(**bad), "n1")
    with pytest.raises(GuestKitError):
        qemu_argv(spec(), "not-alnum")


def test_parse_status() -> None:
    text = "boot\nMPQEMU-GUESTKIT-DONE feed rc=3\nMPQEMU-GUESTKIT-DONE abc rc=12\r\n[ 1.0] reboot\n"
    assert parse_status(text, "abc") == 12
    assert parse_status(text, "feed") == 3
    assert parse_status(text, "ab") is None  # another boot's marker never counts
    assert parse_status("echo MPQEMU-GUESTKIT-DONE abc rc=1", "abc") is None  # must start the line


def test_pci_listing() -> None:
    text = """PCI 0000:00:02.0 0x1b36 0x0005 0x00ff00
RES 0000:00:02.0 0 0x00000000febff000 0x00000000febfffff 0x0000000000040200
RES 0000:00:02.0 1 0x000000000000c000 0x000000000000c0ff 0x0000000000040101
PCI 0000:00:01.0 0x8086 0x7000 0x060100
RES 0000:09:00.0 0 0x1 0x2 0x200
"""
    found = parse_pci_listing(text)
    assert set(found) == {"0000:00:02.0", "0000:00:01.0"}
    (dev,) = by_ids(found, 0x1B36, 5)
    assert dev.ids == "1b36:0005" and dev.pci_class == 0xFF00
    assert dev.bars[0].size == 4096 and dev.bars[0].kind == "mem" and dev.bars[0].flags & IORESOURCE_MEM
    assert dev.bars[1].size == 256 and dev.bars[1].kind == "io" and dev.bars[1].flags & IORESOURCE_IO
    assert found["0000:00:01.0"].bars == {}


def test_qemu11_parsers_and_prefix() -> None:
    assert parse_version("QEMU emulator version 11.1.3 (Debian 1:11.1.3+ds-1)\n") == (11, 1, 3)
    assert parse_version("QEMU emulator version 7.2.22 (Debian)") == (7, 2, 22)
    assert parse_version("nothing") is None
    names = parse_device_names('name "edu", bus PCI\nname "vfio-user-pci", bus PCI, desc "x"\n')
    assert names == {"edu", "vfio-user-pci"}
    prefix = bwrap_prefix(Path("/r"), binds=["/tmp/x"], ro_binds=["/c"])
    assert prefix[:3] == ["bwrap", "--bind", "/r"] and prefix[3] == "/"
    assert prefix[-2:] == ["--die-with-parent", "--"]
    # the private /tmp comes before binds that may live under it
    assert prefix.index("--tmpfs") < prefix.index("/tmp/x")
    assert prefix[prefix.index("--ro-bind"):prefix.index("--ro-bind") + 3] == ["--ro-bind", "/c", "/c"]


def test_shipped_scripts_and_edu_window() -> None:
    for name in ("pci_list.sh", "pci_watch.sh", "edu_check.sh", "edu_irq_uio.sh"):
        assert script_text(name).startswith("#!/bin/sh\n")
    for name in ("edu_check.sh", "edu_irq_uio.sh"):  # the shared edu_find.sh is inlined, once
        text = script_text(name)
        assert not re.search(r"^\. ", text, re.M) and text.count('ok find "${dev##*/}"') == 1
        if Path("/bin/busybox").exists():
            syntax = subprocess.run(["/bin/busybox", "sh", "-n"], input=text, text=True,
                                    capture_output=True, timeout=10, check=False)
            assert syntax.returncode == 0, syntax.stderr
    with pytest.raises(GuestKitError):
        script_text("nosuch.sh")
    assert EDU_DMA_BASE + (1 << 20) <= 256 << 20  # inside the default guest RAM
    assert EDU_DMA_BASE < 1 << 28  # below edu's default dma_mask
    assert f"memmap=1M${EDU_DMA_BASE:#x}" in EDU_APPEND


def test_pci_watch_script_and_its_parser() -> None:
    script = watch_script("DEMO-READY")
    assert script.name == "pci_watch.sh" and dict(script.env) == {"PCI_WATCH_READY": "DEMO-READY"}
    assert "export PCI_WATCH_READY=DEMO-READY\n" in render_init([], script)
    assert 'echo "PCISET$cur"' in script.text
    console = (
        "[    0.5] boot noise\nDEMO-READY\n"
        "PCISET 0000:00:00.0=0x8086:0x1237 0000:00:04.0=0x1234:0x11e8\r\n"
        "PCISET\n"
        "junk PCISET 0000:00:00.0=0x8086:0x1237 stray\n"
    )
    assert parse_pci_sets(console) == [
        {"0000:00:00.0": "0x8086:0x1237", "0000:00:04.0": EDU},
        {},
        {"0000:00:00.0": "0x8086:0x1237"},
    ]
    assert parse_pci_sets("no listing yet") == []


def test_verdicts_of_a_guest_script() -> None:
    transcript = (
        "[    1.2] kernel noise ok\nok find 0000:00:04.0\r\nok id 0x010000ed\n"
        "FAIL dma_roundtrip data differs\nFAIL cfg_read short read at 4\n  ok indented\nedu_check: 2 failed\n"
    )
    passed, failed = verdicts(transcript)
    assert passed == {"find", "id"}
    assert failed == ["FAIL dma_roundtrip data differs", "FAIL cfg_read short read at 4"]
    assert verdicts("") == (set(), [])
