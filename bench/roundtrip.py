"""mpqemu round-trip benchmark: ProxySim config reads and BAR reads, stock x-remote vs ours.

    .venv/bin/python bench/roundtrip.py [--rounds 20] [--batch 200] [--device pci-testdev]
        [--qemu-binary qemu-system-x86_64] [--ours "python -m mpqemu_mgmt.remote"] [--json]

Both remotes serve the same device on a socketpair; ProxySim probes and maps its BARs the way
x-pci-proxy-dev does, then the two kinds of round trip (PCI_CFGREAD of the vendor id, BAR_READ of
4 bytes at BAR0) are timed in batches that alternate between the remotes and between the kinds,
so machine noise (2 shared cores) hits both sides alike. It prints the median µs per round trip
per remote and kind, and the ratio ours/stock. ``--ours`` (or ``--qemu-binary``) takes any argv
prefix, so either remote can be a wrapper; ``--fd N --seccomp off`` is appended to ``--ours``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import shlex
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
from mpqemu_mgmt.testing.stock_remote import DEFAULT_QEMU, StockRemote, settle


@contextlib.contextmanager
def stock(device: str, workdir: Path, qemu: list[str]) -> Iterator[ProxySim]:
    pair = StockRemote.pair(device, workdir=workdir, qmp=True, qemu_binary=qemu, name="stock")
    with pair as (remote, sock):
        settle(remote)
        yield ProxySim(sock)


@contextlib.contextmanager
def ours(device: str, workdir: Path, prefix: list[str]) -> Iterator[ProxySim]:
    proxy_end, remote_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = remote_end.fileno()
    argv = [*prefix, "--device", device, "--fd", str(fd), "--seccomp", "off"]
    with open(workdir / "ours.log", "wb") as log:
        proc = subprocess.Popen(argv, pass_fds=(fd,), stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    remote_end.close()
    try:
        yield ProxySim(proxy_end)
    finally:
        proxy_end.close()
        wait_or_kill(proc, 5)


def time_batch(op: Callable[[], object], n: int) -> float:
    """µs per call over a batch of ``n`` calls."""
    t0 = time.perf_counter_ns()
    for _ in range(n):
        op()
    return (time.perf_counter_ns() - t0) / n / 1000.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--device", default="pci-testdev")
    ap.add_argument("--qemu-binary", default=DEFAULT_QEMU, help="argv prefix of the stock QEMU")
    ap.add_argument("--ours", default=f"{shlex.quote(sys.executable)} -m mpqemu_mgmt.remote",
                    help="argv prefix of our remote")
    ap.add_argument("--json", action="store_true", help="also print one JSON object")
    ap.add_argument("--placement", choices=("split", "same", "none"), default="split",
                    help="client and remotes on different CPUs, on one, or unpinned (testing/pinning.py)")
    args = ap.parse_args(argv)
    cpus = pinning.placement(args.placement)
    client_cpu, remote_cpu = cpus if cpus else (None, None)

    have_ours = importlib.util.find_spec("mpqemu_mgmt.remote.__main__") is not None
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="mpqemu-bench-") as tmp, contextlib.ExitStack() as stack:
        with pinning.children_on(remote_cpu):  # both remotes on one CPU, this client on another
            sims: dict[str, ProxySim] = {
                "stock": stack.enter_context(stock(args.device, Path(tmp), shlex.split(args.qemu_binary)))
            }
            if have_ours:
                sims["ours"] = stack.enter_context(ours(args.device, Path(tmp), shlex.split(args.ours)))
        pinning.pin_self(client_cpu)
        for name, sim in sims.items():
            sim.probe()
            bases = sim.map_bars()
            if 0 not in bases:
                print(f"{name}: BAR0 not found, cannot benchmark BAR reads", file=sys.stderr)
                return 1
            results[name] = {"config_read": [], "bar_read": []}
        for _ in range(args.rounds):
            for name, sim in sims.items():
                ops: dict[str, Callable[[], object]] = {
                    "config_read": functools.partial(sim.config_read, 0, 2),
                    "bar_read": functools.partial(sim.bar_read, sim.bar_bases[0], 4, True),
                }
                for kind, op in ops.items():
                    results[name][kind].append(time_batch(op, args.batch))

    med = {n: {k: statistics.median(v) for k, v in kinds.items()} for n, kinds in results.items()}
    total = args.rounds * args.batch
    print(f"mpqemu round trips, device {args.device}, {args.rounds} interleaved rounds x {args.batch} "
          f"per kind ({total} per remote and kind); median of batch means")
    for kind in ("config_read", "bar_read"):
        line = f"  {kind:<12} stock {med['stock'][kind]:8.1f} µs"
        if "ours" in med:
            ratio = med["ours"][kind] / med["stock"][kind]
            line += f"   ours {med['ours'][kind]:8.1f} µs   ratio ours/stock {ratio:5.2f}"
        print(line)
    if "ours" not in med:
        print("  ours: not available yet")
    if args.json:
        doc = {"device": args.device, "median_us": med, "rounds": args.rounds, "batch": args.batch}
        print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
