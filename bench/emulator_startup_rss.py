"""Start-up and memory of the in-tree remote vs stock QEMU 7.2 x-remote (both serving pci-testdev).

    .venv/bin/python bench/emulator_startup_rss.py [--runs 7] [--json]

* start-up: from spawning the process to the first answered PCI_CFGREAD (what a hot-plug waits
  for; the proxy's first request simply blocks until the remote serves). Goal for ours: ≤ 100 ms.
  Also the CPU time the process used until then (/proc/PID/schedstat), which machine load does
  not inflate: on a shared machine, the wall figure is an upper bound.
* resident memory: VmRSS (and its anonymous part) after the proxy's probe, BAR mapping, a guest
  RAM sync and 2,000 accesses. Goal for ours: ≤ 16 MB (QEMU's x-remote: about 32 MB).

Every remote gets a QMP monitor, as in production (stock: ``-qmp``; ours: ``--qmp-fd``). Ours
runs three ways:

* ``ours-enforce``: as the launcher starts it (confine/launcher.py): the parent compiles the
  seccomp policy and passes the BPF program on ``--seccomp-bpf-fd``; the start-up time includes
  that compilation in the parent;
* ``ours-standalone``: ``--seccomp enforce`` without the fd (a remote started by hand: a forked
  child compiles the policy with pyseccomp and exits, the remote loads the program);
* ``ours-off``: ``--seccomp off``.

Medians over ``--runs`` spawns, alternating the remotes so machine noise hits all alike; ratios
are ours / stock.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from mpqemu_mgmt.confine import lockdown, seccomp_loader
from mpqemu_mgmt.confine.profile import SeccompMode
from mpqemu_mgmt.testing.logged_process import LoggedProcess, on_socketpair
from mpqemu_mgmt.testing.proxysim import ProxySim, memfd_region
from mpqemu_mgmt.testing.stock_remote import StockRemote, settle

MODEL = "pci-testdev"


def cpu_seconds(pid: int) -> float:
    """CPU time the process has run so far (/proc/PID/schedstat, ns): immune to machine load."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def rss_kib(pid: int) -> tuple[int, int]:
    vals = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon"):
                vals[key] = int(rest.split()[0])
    return vals["VmRSS"], vals["RssAnon"]


def ours(kind: str, workdir: Path) -> contextlib.AbstractContextManager[tuple[LoggedProcess, socket.socket]]:
    """Our remote with a QMP listener; ``ours-enforce`` with the filter compiled by the parent."""

    def spawn(remote_fd: int) -> LoggedProcess:
        mode = "off" if kind == "ours-off" else "enforce"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        qmp_path = workdir / f"{kind}.qmp"
        with contextlib.suppress(FileNotFoundError):
            qmp_path.unlink()
        listener.bind(str(qmp_path))
        listener.listen(1)
        keep = [remote_fd, listener.detach()]
        argv = [sys.executable, "-m", "mpqemu_mgmt.remote", "--device", MODEL, "--fd", str(remote_fd),
                "--qmp-fd", str(keep[1]), "--seccomp", mode]
        if kind == "ours-enforce":
            # what launcher.launch does for a builtin remote
            bpf = seccomp_loader.bpf_memfd(lockdown.load_policy(MODEL), SeccompMode.ENFORCE)
            keep.append(bpf)
            argv += ["--seccomp-bpf-fd", str(bpf)]
        return LoggedProcess(argv, workdir=workdir, name=kind, pass_fds=keep)  # closes keep

    return on_socketpair(spawn, grace=2.0)


@contextlib.contextmanager
def spawn(kind: str, workdir: Path) -> Iterator[tuple[int, ProxySim, float, float]]:
    """Yield (pid, ProxySim, wall seconds and CPU seconds from spawn to the first answered read)."""
    t0 = time.perf_counter()
    cm: contextlib.AbstractContextManager[tuple[LoggedProcess, socket.socket]]
    if kind == "stock":
        cm = StockRemote.pair(MODEL, workdir=workdir, name="stock", qmp=True)
    else:
        cm = ours(kind, workdir)
    with cm as (remote, sock), ProxySim(sock, timeout=20) as px:
        assert px.config_read(0, 4) == 0x00051B36
        elapsed = time.perf_counter() - t0
        cpu = cpu_seconds(remote.pid)
        if isinstance(remote, StockRemote):
            settle(remote)  # protocol.md §4.x: config writes before the initial reset are undone
        yield remote.pid, px, elapsed, cpu


def steady_state(px: ProxySim) -> None:
    px.probe()
    px.map_bars()
    region = memfd_region(64 << 20)
    px.sync_sysmem([region])
    region.fd.close()
    for i in range(1000):
        px.config_read(i % 64 * 4, 4)
        px.bar_read_at(0, i % 64, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    kinds = ("stock", "ours-enforce", "ours-standalone", "ours-off")
    start: dict[str, list[float]] = {k: [] for k in kinds}
    cpu: dict[str, list[float]] = {k: [] for k in kinds}
    rss: dict[str, list[tuple[int, int]]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="mpqemu-bench-") as tmp:
        for run in range(args.runs):
            for kind in kinds if run % 2 == 0 else reversed(kinds):
                with spawn(kind, Path(tmp)) as (pid, px, seconds, cpu_s):
                    start[kind].append(seconds)
                    cpu[kind].append(cpu_s)
                    steady_state(px)
                    time.sleep(0.05)
                    rss[kind].append(rss_kib(pid))
    out = {}
    for kind in kinds:
        out[kind] = {
            "start_ms": statistics.median(start[kind]) * 1000,
            "start_cpu_ms": statistics.median(cpu[kind]) * 1000,
            "rss_mib": statistics.median(r[0] for r in rss[kind]) / 1024,
            "rss_anon_mib": statistics.median(r[1] for r in rss[kind]) / 1024,
        }
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    s = out["stock"]
    print(f"remote start-up and memory, pci-testdev, median of {args.runs} spawns (ratios ours/stock)")
    for kind in kinds:
        o = out[kind]
        ms, mib, cms = o["start_ms"], o["rss_mib"], o["start_cpu_ms"]
        print(
            f"  {kind:15s} start to first answer {ms:7.1f} ms ({ms / s['start_ms']:.2f}),"
            f" CPU {cms:6.1f} ms ({cms / s['start_cpu_ms']:.2f})"
            f"   RSS {mib:5.1f} MiB ({mib / s['rss_mib']:.2f}), anon {o['rss_anon_mib']:5.1f} MiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
