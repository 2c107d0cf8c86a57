"""vfio-user benchmark, one run, two comparisons (issue 9 item 5).

    .venv/bin/python bench/vfio_user.py [--rounds 15] [--batch 300] [--boots 2] [--mib 32]
        [--skip-guest] [--json]

1. Round trips, same remote binary, same model (pci-testdev), same machine moment: our remote
   over mpqemu (ProxySim: PCI_CFGREAD of the vendor id, BAR_READ of 4 bytes at BAR0) and over
   vfio-user (VfioUserClient: REGION_READ of config offset 0, REGION_READ of BAR0), batches
   alternating between the transports. Median µs per round trip; ratio vfio-user / mpqemu.
2. Guest-visible virtio-blk throughput on the same QEMU 11.1 binary under TCG: our virtio-blk
   behind ``vfio-user-pci`` (a confined remote process) vs QEMU's in-process ``virtio-blk-pci``
   (legacy, ``vectors=0`` so it also interrupts by INTx like ours; raw file, cache=writeback).
   The guest's own virtio_blk driver runs ``dd`` of ``--mib`` MiB out (conv=fsync) and back in
   (after drop_caches), timed in the guest. Boots alternate; medians; ratio ours / in-process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from mpqemu_mgmt.testing import pinning
from mpqemu_mgmt.testing.logged_process import wait_or_kill
from mpqemu_mgmt.testing.proxysim import ProxySim
from mpqemu_mgmt.testing.vfio_user_client import VfioUserClient


@contextlib.contextmanager
def remote(transport: str, workdir: Path) -> Iterator[socket.socket]:
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    argv = [sys.executable, "-m", "mpqemu_mgmt.remote", "--device", "pci-testdev",
            "--fd", str(theirs.fileno()), "--transport", transport, "--seccomp", "off"]
    with open(workdir / f"{transport}.log", "wb") as log:
        proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), stdout=log, stderr=log)
    theirs.close()
    try:
        yield mine
    finally:
        mine.close()
        wait_or_kill(proc, 5)


def per_call_us(op: Callable[[], object], n: int) -> float:
    t0 = time.perf_counter_ns()
    for _ in range(n):
        op()
    return (time.perf_counter_ns() - t0) / n / 1000.0


def roundtrips(rounds: int, batch: int) -> dict[str, dict[str, float]]:
    samples: dict[str, list[float]] = {k: [] for k in ("mpqemu_cfg", "mpqemu_bar", "vfio_cfg", "vfio_bar")}
    cpus = pinning.placement("split")  # remotes on one CPU, this client on another (pinning.py)
    client_cpu, remote_cpu = cpus if cpus else (None, None)
    with tempfile.TemporaryDirectory(prefix="bench-vu-") as tmp, contextlib.ExitStack() as stack:
        with pinning.children_on(remote_cpu):
            mpqemu_sock = stack.enter_context(remote("mpqemu", Path(tmp)))
            vfio_sock = stack.enter_context(remote("vfio-user", Path(tmp)))
        stack.enter_context(pinning.children_on(client_cpu))  # restored for the guest runs after
        sim = ProxySim(mpqemu_sock)
        sim.probe()
        sim.map_bars()
        client = VfioUserClient(vfio_sock)
        client.handshake()
        ops: dict[str, Callable[[], object]] = {
            "mpqemu_cfg": lambda: sim.config_read(0, 4),
            "mpqemu_bar": lambda: sim.bar_read_at(0, 0, 4),
            "vfio_cfg": lambda: client.config_read(0, 4),
            "vfio_bar": lambda: client.read(0, 0, 4),
        }
        assert sim.config_read(0, 4) == client.config_read(0, 4) == 0x00051B36
        for op in ops.values():  # warm-up
            per_call_us(op, 50)
        for r in range(rounds):
            order = list(ops) if r % 2 == 0 else list(reversed(ops))
            for name in order:
                samples[name].append(per_call_us(ops[name], batch))
        sim.close()
    med = {k: statistics.median(v) for k, v in samples.items()}
    return {
        "config_read_us": {"mpqemu": med["mpqemu_cfg"], "vfio_user": med["vfio_cfg"],
                           "ratio_vfio_user_over_mpqemu": med["vfio_cfg"] / med["mpqemu_cfg"]},
        "bar_read_us": {"mpqemu": med["mpqemu_bar"], "vfio_user": med["vfio_bar"],
                        "ratio_vfio_user_over_mpqemu": med["vfio_bar"] / med["mpqemu_bar"]},
    }


GUEST = """
tries=0
while [ ! -b /dev/vda ] && [ $tries -lt 100 ]; do usleep 50000; tries=$((tries + 1)); done
[ -b /dev/vda ] || exit 9
up() {{ read -r u _ < /proc/uptime; echo "$u"; }}
t0=$(up)
dd if=/dev/zero of=/dev/vda bs=1M count={mib} conv=fsync 2>/dev/null || exit 2
t1=$(up)
echo 3 > /proc/sys/vm/drop_caches
t2=$(up)
dd if=/dev/vda of=/dev/null bs=1M count={mib} 2>/dev/null || exit 3
t3=$(up)
echo "BENCH write $t0 $t1 read $t2 $t3"
"""


def _guest_run(kind: str, mib: int, tmp: Path) -> tuple[float, float]:
    from mpqemu_mgmt.guestkit.boot import boot_script
    from mpqemu_mgmt.guestkit.initramfs import GuestScript
    from mpqemu_mgmt.guestkit.kernel import fetch_kernel
    from mpqemu_mgmt.guestkit.qemu11 import fetch_qemu11
    from mpqemu_mgmt.testing.vfio_user_remote import VfioUserRemote

    qemu, kernel = fetch_qemu11(), fetch_kernel()
    disk = tmp / f"{kind}.img"
    with open(disk, "wb") as f:
        f.truncate((mib + 8) << 20)
    script = GuestScript(GUEST.format(mib=mib), name="bench.sh")
    common = dict(modules=("virtio_pci", "virtio_blk"), accel="tcg", qemu_binary="qemu-system-x86_64",
                  timeout=300.0, memory_mib=256)
    if kind == "vfio-user":
        with VfioUserRemote("virtio-blk", "vblk0", backing=disk, workdir=tmp) as r:
            result = boot_script(kernel, script, devices=(r.device_json(),),
                                 qemu_argv_prefix=qemu.argv_prefix(binds=[r.dir]), **common)  # type: ignore[arg-type]
    else:
        result = boot_script(
            kernel, script,
            devices=("virtio-blk-pci,drive=d0,disable-modern=on,vectors=0",),
            extra_args=("-drive", f"file={disk},if=none,id=d0,format=raw,cache=writeback"),
            qemu_argv_prefix=qemu.argv_prefix(binds=[tmp]), **common,  # type: ignore[arg-type]
        )
    m = re.search(r"BENCH write (\S+) (\S+) read (\S+) (\S+)", result.transcript)
    if result.status != 0 or m is None:
        raise RuntimeError(f"{kind} guest failed: status {result.status}\n{result.transcript[-2000:]}")
    t0, t1, t2, t3 = (float(x) for x in m.groups())
    return mib / max(t1 - t0, 0.01), mib / max(t3 - t2, 0.01)


def throughput(boots: int, mib: int) -> dict[str, object]:
    runs: dict[str, list[tuple[float, float]]] = {"vfio-user": [], "in-process": []}
    with tempfile.TemporaryDirectory(prefix="bench-vu-guest-") as tmp:
        for b in range(boots):
            for kind in (("vfio-user", "in-process") if b % 2 == 0 else ("in-process", "vfio-user")):
                runs[kind].append(_guest_run(kind, mib, Path(tmp)))
    out: dict[str, object] = {"mib": mib, "boots_each": boots}
    for i, what in enumerate(("write_MBps", "read_MBps")):
        ours = statistics.median(r[i] for r in runs["vfio-user"])
        stock = statistics.median(r[i] for r in runs["in-process"])
        out[what] = {"ours_vfio_user": round(ours, 2), "qemu_in_process": round(stock, 2),
                     "ratio_ours_over_in_process": round(ours / stock, 3)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, default=300)
    ap.add_argument("--boots", type=int, default=2)
    ap.add_argument("--mib", type=int, default=32)
    ap.add_argument("--skip-guest", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    report: dict[str, object] = {"roundtrips": roundtrips(args.rounds, args.batch)}
    rt = report["roundtrips"]
    assert isinstance(rt, dict)
    for kind, vals in rt.items():
        print(f"{kind:16s} mpqemu {vals['mpqemu']:8.1f} µs   vfio-user {vals['vfio_user']:8.1f} µs   "
              f"ratio vfio-user/mpqemu {vals['ratio_vfio_user_over_mpqemu']:.3f}")
    if not args.skip_guest:
        tp = throughput(args.boots, args.mib)
        report["virtio_blk_guest"] = tp
        for what in ("write_MBps", "read_MBps"):
            v = tp[what]
            assert isinstance(v, dict)
            print(f"guest dd {what:10s} ours over vfio-user {v['ours_vfio_user']:8.2f}   QEMU in-process "
                  f"{v['qemu_in_process']:8.2f}   ratio {v['ratio_ours_over_in_process']:.3f}")
    if args.json:
        print(json.dumps(report, indent=2))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
