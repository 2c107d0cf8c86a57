"""The kit's IO edges without a guest: a third-party cpio reader (busybox) accepts our archives,
build_once publishes exactly one build when processes race and cleans up after failures, image
pruning, and the quick refusals of the KVM probe and the boot runner."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from mpqemu_mgmt.errors import GuestKitError, ProcessFailed
from mpqemu_mgmt.guestkit import kvm
from mpqemu_mgmt.guestkit.boot import boot
from mpqemu_mgmt.guestkit.cache import build_once, prune
from mpqemu_mgmt.guestkit.cpio import CpioEntry, write_newc
from mpqemu_mgmt.guestkit.qemu_argv import BootSpec

BUSYBOX = shutil.which("busybox")


@pytest.mark.skipif(BUSYBOX is None, reason="busybox (apt busybox-static) is not installed")
def test_busybox_cpio_extracts_our_archive(tmp_path: Path) -> None:
    payload = os.urandom(5000)
    archive = write_newc([
        CpioEntry.directory("d"),
        CpioEntry.file("d/data.bin", payload, 0o640),
        CpioEntry.file("d/odd", b"abc", 0o755),  # 3 bytes: the next header needs padding
        CpioEntry.symlink("d/link", "data.bin"),
        CpioEntry.directory("d/empty"),
    ])
    out = tmp_path / "x"
    out.mkdir()
    listing = subprocess.run([BUSYBOX, "cpio", "-t"], input=archive, capture_output=True, check=True,
                             timeout=30).stdout.decode().split()
    assert listing == ["d", "d/data.bin", "d/odd", "d/link", "d/empty"]
    subprocess.run([BUSYBOX, "cpio", "-i", "-d", "-m"], input=archive, cwd=out, capture_output=True,
                   check=True, timeout=30)
    assert (out / "d/data.bin").read_bytes() == payload
    assert stat.S_IMODE((out / "d/data.bin").stat().st_mode) == 0o640
    assert (out / "d/odd").read_bytes() == b"abc"
    assert os.readlink(out / "d/link") == "data.bin"
    assert (out / "d/empty").is_dir()


def _racer(item: str, log: str) -> None:
    def build(tmp: Path) -> None:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        tmp.mkdir()
        time.sleep(0.3)  # long enough that the others are waiting on the lock
        (tmp / "content").write_text("built")

    build_once(Path(item), build)
    assert (Path(item) / "content").read_text() == "built"


def test_build_once_races_to_one_build(tmp_path: Path) -> None:
    item, log = tmp_path / "item", tmp_path / "builds.log"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_racer, args=(str(item), str(log))) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert len(log.read_text().split()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["builds.log", "item", "item.lock"]


def test_build_once_failure_leaves_nothing(tmp_path: Path) -> None:
    item = tmp_path / "item"

    def broken(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "half").write_text("x")
        raise OSError("disk full")

    with pytest.raises(GuestKitError, match="disk full"):
        build_once(item, broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["item.lock"]
    build_once(item, lambda tmp: tmp.write_text("ok"))  # a later build still works
    assert item.read_text() == "ok"


def test_kvm_probe_refuses_quickly_without_a_device(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(kvm, "KVM_DEVICE", tmp_path / "no-kvm")
    start = time.monotonic()
    ok, reason = kvm.probe_kvm_boot()
    assert (ok, time.monotonic() - start < 1) == (False, True)
    assert "does not exist" in reason


def test_build_once_clears_leftovers_of_killed_builders(tmp_path: Path) -> None:
    stale = tmp_path / ".item.tmp-99999"
    stale.mkdir()
    (stale / "junk").write_text("x")
    build_once(tmp_path / "item", lambda tmp: tmp.write_text("ok"))
    assert not stale.exists()


def test_prune_keeps_the_newest_and_the_recently_used(tmp_path: Path) -> None:
    now = time.time()
    for i in range(6):
        path = tmp_path / f"{i}.cpio"
        path.write_bytes(b"x")
        age = 0 if i == 0 else 10_000 + i  # 0 is fresh, the rest old (5 oldest)
        os.utime(path, (now - age, now - age))
    assert prune(tmp_path, "*.cpio", keep=2, min_age_s=3600) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.cpio", "1.cpio"]
    # a recent file beyond `keep` survives: a concurrent boot may be about to open it
    (tmp_path / "2.cpio").write_bytes(b"y")
    assert prune(tmp_path, "*.cpio", keep=1, min_age_s=3600) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0.cpio", "2.cpio"]


def test_boot_without_qemu_is_a_process_failure(tmp_path: Path) -> None:
    spec = BootSpec(kernel=tmp_path / "k", initrd=tmp_path / "i", qemu_binary=str(tmp_path / "no-qemu"))
    with pytest.raises(ProcessFailed, match="cannot start QEMU"):
        boot(spec, timeout=5)
