"""virtio-blk benchmark: our remote vs QEMU 7.2's x-remote virtio-blk-pci, same driver, same run.

    .venv/bin/python bench/virtio_blk.py [--rounds 30] [--seconds 0.2] [--image-mib 256]
        [--depth-seq 16] [--depth-rand 32] [--seccomp enforce|off] [--json]

Both remotes are real processes on an mpqemu socket (stock: ``-drive file=…,format=raw -device
virtio-blk-pci,vectors=0``; ours: ``python -m mpqemu_mgmt.remote --device virtio-blk
--backing-fd K``). One Python legacy virtio driver (mpqemu_mgmt/testing/virtio_driver.py) drives
each through ProxySim: guest RAM is a shared memfd, a batch of ``depth`` requests is queued, one
I/O BAR write kicks it, completions are reaped after the irqfd eventfd fires. Both images are
raw files of the same size on the same filesystem, read once before timing so both start from
the page cache.

Workloads: sequential 128 KiB reads, sequential 128 KiB writes (MB/s), random 4 KiB reads
(IOPS). Each workload runs as ``rounds`` pairs of back-to-back slices (stock then ours, then
ours then stock, ...), so the drifting load of the shared machine hits both sides of a pair
alike; the median of the per-pair ratios ours/stock is reported with its inter-quartile range
(goals: ≥ 1.0 for the sequential ones, ≥ 0.7 for random reads). Also printed: how busy each
remote's CPU was over its slices (ours busy-polls its socket after each reply, remote/polling.py,
and so trades CPU for latency; ``--poll-us 0`` shows it without). ``--depth-seq 1 --depth-rand 1``
measures one request per kick (latency-bound) instead of a queue of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mpqemu_mgmt.devices.virtio.constants import BLK_S_OK, BLK_T_IN, BLK_T_OUT
from mpqemu_mgmt.procfs import proc_cpu_ticks
from mpqemu_mgmt.testing import pinning
from mpqemu_mgmt.testing.virtio_blk_remotes import Attached, attach, builtin_blk, stock_blk
from mpqemu_mgmt.testing.virtio_driver import Request, VirtioBlkDriver

KIB = 1024


class Workload:
    def __init__(self, name: str, unit: str, size: int, depth: int, make: Callable[[int, int], Request]):
        self.name, self.unit, self.size, self.depth, self.make = name, unit, size, depth, make


def run_for(drv: VirtioBlkDriver, wl: Workload, seconds: float, cursor: list[int]) -> float:
    """Run batches for ``seconds``; return MB/s or IOPS."""
    done = 0
    start = time.perf_counter()
    end = start + seconds
    while True:
        reqs = [wl.make(cursor[0] + i, wl.size) for i in range(wl.depth)]
        cursor[0] += wl.depth
        results = drv.run(reqs)
        if any(c.status != BLK_S_OK for c in results):
            raise SystemExit(f"{wl.name}: a request failed: {results}")
        done += wl.depth
        now = time.perf_counter()
        if now >= end:
            break
    elapsed = now - start
    if wl.unit == "MB/s":
        return done * wl.size / elapsed / 1e6
    return done / elapsed


@contextlib.contextmanager
def both(
    workdir: Path, image_mib: int, seccomp: str, ours_args: Sequence[str] = ()
) -> Iterator[tuple[dict[str, Attached], dict[str, int]]]:
    images = {}
    for name in ("stock", "ours"):
        path = workdir / f"{name}.img"
        with open(path, "wb") as f:
            chunk = random.Random(name).randbytes(1 << 20)
            for _ in range(image_mib):
                f.write(chunk)
        images[name] = path
    with (
        stock_blk(images["stock"], workdir=workdir) as (s_proc, s_sock),
        builtin_blk(images["ours"], workdir=workdir, seccomp=seccomp, extra_args=ours_args) as (
            o_proc, o_sock),
        attach(s_sock, ram_size=64 << 20) as s_att,
        attach(o_sock, ram_size=64 << 20) as o_att,
    ):
        atts = {"stock": s_att, "ours": o_att}
        for att in atts.values():
            att.driver.init()
            att.driver.zero_fill = False
            att.driver.collect = False
        yield atts, {"stock": s_proc.pid, "ours": o_proc.pid}


def cpu_seconds(pid: int) -> float:
    """CPU time of the whole process, every thread."""
    ticks = proc_cpu_ticks(pid)
    if ticks is None:
        raise SystemExit(f"remote {pid} is gone")
    return ticks / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--seconds", type=float, default=0.2, help="per slice, per remote")
    p.add_argument("--image-mib", type=int, default=256)
    p.add_argument("--depth-seq", type=int, default=16)
    p.add_argument("--depth-rand", type=int, default=32)
    p.add_argument("--seccomp", choices=("enforce", "off"), default="enforce")
    p.add_argument("--json", action="store_true")
    p.add_argument("--poll-us", type=float, help="our remote's --poll-us (default: its own default)")
    p.add_argument("--placement", choices=("split", "same", "none"), default="split",
                   help="driver and remotes on different CPUs, on one, or unpinned (testing/pinning.py)")
    args = p.parse_args(argv)
    cpus = pinning.placement(args.placement)
    client_cpu, remote_cpu = cpus if cpus else (None, None)

    sectors = (args.image_mib << 20) // 512
    rnd = random.Random(5)
    seq_span = sectors // 256  # 128 KiB slots

    workloads = [
        Workload("seq-read-128k", "MB/s", 128 * KIB, args.depth_seq,
                 lambda i, n: Request(BLK_T_IN, (i % seq_span) * 256, read_len=n)),
        Workload("seq-write-128k", "MB/s", 128 * KIB, args.depth_seq,
                 lambda i, n: Request(BLK_T_OUT, (i % seq_span) * 256, data=WRITE_BUF[:n])),
        Workload("rand-read-4k", "IOPS", 4 * KIB, args.depth_rand,
                 lambda i, n: Request(BLK_T_IN, rnd.randrange(sectors // 8) * 8, read_len=n)),
    ]  # fmt: skip

    results: dict[str, dict[str, list[float]]] = {w.name: {"stock": [], "ours": []} for w in workloads}
    # the remotes' CPU time over their slices (ours busy-polls after each reply: polling.py)
    busy: dict[str, dict[str, list[float]]] = {w.name: {"stock": [0.0, 0.0], "ours": [0.0, 0.0]}
                                               for w in workloads}
    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-virtio-blk-"))
        with pinning.children_on(remote_cpu):  # both remotes (and stock's I/O threads) on one CPU
            ours_args = [] if args.poll_us is None else ["--poll-us", str(args.poll_us)]
            atts, pids = stack.enter_context(both(Path(tmp), args.image_mib, args.seccomp, ours_args))
        pinning.pin_self(client_cpu)
        cursors = {name: [0] for name in atts}
        # Warm-up: read both images once (page cache), and let both processes settle.
        for name, att in atts.items():
            run_for(att.driver, workloads[0], 0.3, cursors[name])
            for start in range(0, seq_span, args.depth_seq):
                att.driver.run(
                    [
                        Request(BLK_T_IN, ((start + i) % seq_span) * 256, read_len=128 * KIB)
                        for i in range(args.depth_seq)
                    ]
                )
        for wl in workloads:
            for r in range(args.rounds):
                # Paired, alternating slices: the load of the shared machine drifts by the second,
                # so each ours/stock ratio compares two slices taken back to back.
                order = ["stock", "ours"] if r % 2 == 0 else ["ours", "stock"]
                for name in order:
                    c0, t0 = cpu_seconds(pids[name]), time.perf_counter()
                    results[wl.name][name].append(run_for(atts[name].driver, wl, args.seconds, cursors[name]))
                    busy[wl.name][name][0] += cpu_seconds(pids[name]) - c0
                    busy[wl.name][name][1] += time.perf_counter() - t0
        kicks = {name: att.driver.kicks for name, att in atts.items()}
        idle = {name: att.driver.idle_waits for name, att in atts.items()}

    summary: list[dict[str, Any]] = []
    for wl in workloads:
        st, ou = results[wl.name]["stock"], results[wl.name]["ours"]
        ratios = sorted(o / s for s, o in zip(st, ou, strict=True))
        q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
        summary.append({"workload": wl.name, "unit": wl.unit, "depth": wl.depth,
                        "stock": round(statistics.median(st), 1), "ours": round(statistics.median(ou), 1),
                        "ratio": round(statistics.median(ratios), 3),
                        "ratio_iqr": [round(q1, 3), round(q3, 3)],
                        "cpu_busy": {n: round(c / w, 3) for n, (c, w) in busy[wl.name].items()}})  # fmt: skip
    if args.json:
        json.dump(
            {"results": summary, "rounds": args.rounds, "kicks": kicks, "idle_waits": idle,
             "loadavg": os.getloadavg()},
            sys.stdout,
            indent=1,
        )
        print()
    else:
        print(f"{'workload':16} {'depth':>5} {'stock':>14} {'ours':>14} {'ours/stock':>10}  IQR"
              "           remote CPU busy: stock  ours")
        for row in summary:
            print(
                f"{row['workload']:16} {row['depth']:>5} {row['stock']:>9.1f} {row['unit']:<4}"
                f"{row['ours']:>10.1f} {row['unit']:<4}{row['ratio']:>8.3f}"
                f"  {row['ratio_iqr'][0]:.3f}..{row['ratio_iqr'][1]:.3f}"
                f"                   {row['cpu_busy']['stock']:5.0%} {row['cpu_busy']['ours']:5.0%}"
            )
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"(median of {args.rounds} paired {args.seconds} s slices per workload; kicks {kicks})")
        print(f"(load average {load}; waits without an interrupt {idle}; placement {args.placement} {cpus})")
    return 0


WRITE_BUF = random.Random(9).randbytes(128 * KIB)

if __name__ == "__main__":
    raise SystemExit(main())
