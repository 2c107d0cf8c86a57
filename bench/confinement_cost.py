"""Cost of confinement: start-up and mpqemu round trip, confined vs unconfined, in the same run.

    .venv/bin/python bench/confinement_cost.py [--starts 10] [--rounds 15] [--batch 200]
        [--device pci-testdev] [--json]

Variants of our remote (``python -m mpqemu_mgmt.remote``), all serving the same device:

* ``bare``: plain ``subprocess.Popen``, ``--seccomp off``, no uid drop, no namespaces;
* ``seccomp``: the same with ``--seccomp enforce`` (lock_down: NNP, not dumpable, the allowlist);
* ``confined``: :func:`mpqemu_mgmt.confine.launcher.launch` with the default profile (dedicated
  uid, prlimit rlimits, bwrap user/pid/net/ipc/uts/cgroup/mount namespaces, seccomp enforce).

And stock QEMU's x-remote, bare vs confined by the same launcher (``-sandbox on,...`` inside).

Start-up is spawn → an answered QMP ``query-status`` on the inherited listening socket (the
remote greets only after lock_down; stock x-remote answers only after its initial reset).
Round trips are ProxySim PCI_CFGREAD and BAR_READ (as x-pci-proxy-dev sends them), timed in
batches that alternate between variants so noise on the 2 shared cores hits all alike; the
median µs per round trip is printed with the ratio to ``bare``. Needs root and bwrap for the
confined variants.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from mpqemu_mgmt.confine.launcher import LaunchRequest, launch, profile_for
from mpqemu_mgmt.confine.profile import ConfinementProfile
from mpqemu_mgmt.errors import MpqemuError
from mpqemu_mgmt.testing import pinning
from mpqemu_mgmt.testing.logged_process import wait_or_kill
from mpqemu_mgmt.testing.proxysim import ProxySim


def _greeting(path: Path, alive: Callable[[], bool], timeout: float = 20.0) -> None:
    """Wait until the remote answers ``query-status`` on its QMP socket.

    The greeting alone is not enough for a stock x-remote: 7.2 serves the mpqemu socket before its
    initial machine reset, which undoes early BAR programming (protocol.md §4.x); an answered
    query-status means the main loop runs, after that reset. Same wait for every variant.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("remote died during start-up")
        with socket.socket(socket.AF_UNIX) as c:
            try:
                c.connect(str(path))
                c.settimeout(max(0.01, deadline - time.monotonic()))
                reader = c.makefile("rb")
                if b'"QMP"' in reader.readline():
                    c.sendall(b'{"execute":"qmp_capabilities"}\n{"execute":"query-status"}\n')
                    reader.readline()
                    if b'"running"' in reader.readline():
                        return
            except OSError:
                pass
        time.sleep(0.001)
    raise TimeoutError("no answer to query-status")


@contextlib.contextmanager
def bare(device: str, workdir: Path, seccomp: str, backend: str) -> Iterator[tuple[ProxySim, float]]:
    """Our remote (or stock QEMU) spawned directly, as a test harness would."""
    proxy_end, remote_end = socket.socketpair()
    qmp_path = workdir / f"bare-{time.monotonic_ns()}.qmp"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(qmp_path))
    listener.listen(4)
    fd, qfd = remote_end.fileno(), listener.fileno()
    if backend == "builtin":
        argv = [sys.executable, "-I", "-m", "mpqemu_mgmt.remote", "--device", device, "--fd", str(fd),
                "--qmp-fd", str(qfd), "--seccomp", seccomp]
    else:
        argv = ["qemu-system-x86_64", "-machine", "x-remote,vfio-user=off", "-accel", "tcg,tb-size=16",
                "-nodefaults", "-display", "none", "-device", f"{device},id=d0",
                "-object", f"x-remote-object,id=r0,devid=d0,fd={fd}",
                "-chardev", f"socket,id=mon,fd={qfd},server=on,wait=off", "-mon", "chardev=mon,mode=control"]
    t0 = time.perf_counter()
    with open(qmp_path.with_suffix(".log"), "wb") as log:
        proc = subprocess.Popen(argv, pass_fds=(fd, qfd), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    remote_end.close()
    listener.close()
    try:
        _greeting(qmp_path, lambda: proc.poll() is None)
        started = time.perf_counter() - t0
        yield ProxySim(proxy_end), started
    finally:
        proxy_end.close()
        wait_or_kill(proc, 2)
        with contextlib.suppress(FileNotFoundError):
            qmp_path.unlink()


@contextlib.contextmanager
def confined(device: str, workdir: Path, seccomp: str, backend: str) -> Iterator[tuple[ProxySim, float]]:
    qmp_path = workdir / f"c-{time.monotonic_ns()}.qmp"
    req = LaunchRequest(f"c{time.monotonic_ns() % 10**9}", device, qmp_path,
                        backend="qemu" if backend == "qemu" else "builtin",
                        log_path=qmp_path.with_suffix(".log"))
    profile = profile_for(req.backend, ConfinementProfile().with_seccomp(seccomp))
    t0 = time.perf_counter()
    remote = launch(req, profile)
    try:
        _greeting(req.qmp_path, lambda: remote.poll() is None)
        started = time.perf_counter() - t0
        yield ProxySim(remote.proxy), started
    finally:
        remote.stop(1.0)


Factory = Callable[..., contextlib.AbstractContextManager[tuple[ProxySim, float]]]
VARIANTS: dict[str, tuple[Factory, str, str]] = {
    "bare": (bare, "off", "builtin"),
    "seccomp": (bare, "enforce", "builtin"),
    "confined": (confined, "enforce", "builtin"),
    "qemu-bare": (bare, "off", "qemu"),
    "qemu-confined": (confined, "enforce", "qemu"),
}


def _time_batch(op: Callable[[], object], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        op()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--starts", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--device", default="pci-testdev")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--placement", choices=("split", "same", "none"), default="split",
                    help="round trips: client and remotes on different CPUs, on one, or unpinned")
    args = ap.parse_args()
    cpus = pinning.placement(args.placement)
    client_cpu, remote_cpu = cpus if cpus else (None, None)
    if os.geteuid() != 0 or shutil.which("bwrap") is None:
        print("confinement_cost: needs root and bubblewrap", file=sys.stderr)
        return 2
    qemu_device = {"pci-testdev": "pci-testdev"}.get(args.device)
    names = [n for n in VARIANTS if qemu_device or not n.startswith("qemu")]
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="confinement-cost-") as tmp:
        workdir = Path(tmp)
        os.chmod(workdir, 0o755)
        # start-up: interleaved so each variant sees the same machine load
        starts: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(args.starts):
            for n in names:
                factory, mode, backend = VARIANTS[n]
                device = qemu_device if backend == "qemu" else args.device
                with factory(device, workdir, mode, backend) as (_, started):
                    starts[n].append(started * 1e3)
        # round trips: all variants up at once, batches alternate; every remote on one CPU and
        # this client on another (testing/pinning.py: unpinned round trips are bimodal here)
        with contextlib.ExitStack() as stack:
            sims: dict[str, ProxySim] = {}
            for n in names:
                factory, mode, backend = VARIANTS[n]
                device = qemu_device if backend == "qemu" else args.device
                with pinning.children_on(remote_cpu):
                    sim, _ = stack.enter_context(factory(device, workdir, mode, backend))
                sims[n] = sim
            pinning.pin_self(client_cpu)
            for sim in sims.values():
                sim.probe()
                sim.map_bars()
                sim.config_write(0x04, sim.config_read(0x04, 2) | 0x3, 2)
            cfg: dict[str, list[float]] = {n: [] for n in names}
            bar: dict[str, list[float]] = {n: [] for n in names}
            for _ in range(args.rounds):
                for n, sim in sims.items():
                    try:
                        cfg[n].append(_time_batch(lambda s=sim: s.config_read(0, 4), args.batch))  # type: ignore[misc]
                        bar[n].append(_time_batch(lambda s=sim: s.bar_read_at(0, 0, 4), args.batch))  # type: ignore[misc]
                    except (OSError, MpqemuError) as exc:
                        logs = {p.name: p.read_text(errors="replace")[-500:] for p in workdir.glob("*.log")}
                        detail = json.dumps(logs, indent=1)
                        raise SystemExit(f"variant {n} failed: {exc!r}\n{detail}") from exc
        for n in names:
            results[n] = {"startup_ms": statistics.median(starts[n]),
                          "cfgread_us": statistics.median(cfg[n]), "barread_us": statistics.median(bar[n])}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"device {args.device}; {args.starts} starts, "
          f"{args.rounds}x{args.batch} round trips per kind (medians); placement {args.placement} {cpus}")
    print(f"{'variant':15} {'start-up ms':>12} {'x bare':>7} {'cfg read µs':>12} {'x bare':>7} "
          f"{'BAR read µs':>12} {'x bare':>7}")
    for n in names:
        base = results["qemu-bare" if n.startswith("qemu") else "bare"]
        r = results[n]
        print(f"{n:15} {r['startup_ms']:12.1f} {r['startup_ms'] / base['startup_ms']:7.2f} "
              f"{r['cfgread_us']:12.1f} {r['cfgread_us'] / base['cfgread_us']:7.2f} "
              f"{r['barread_us']:12.1f} {r['barread_us'] / base['barread_us']:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
