"""Orchestration figures (issue 7): attach → device realized, and 16 remotes start → running.

    .venv/bin/python bench/orchestrate_bench.py [--rounds N] [--json]

Direct driver, TCG, no guest OS (the goal is stated "before boot"). The guest is paused while
attaching so its idle vCPU does not compete for the two cores. Each attach is timed from the call
to ``DirectDriver.attach`` until it returns, which is after ``device_add`` returned, i.e. after
QEMU realized the proxy (hw/remote/proxy.c ``pci_proxy_dev_realize`` probes the remote's config
space over the socket), and includes the remote's (confined) start and its first QMP answer.
Goals: attach ≤ 150 ms with a confined remote; 16 remotes from start to running ≤ 3 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mpqemu_mgmt.domain.spec import DeviceSpec, parse_spec
from mpqemu_mgmt.orchestrate.driver import DirectDriver
from mpqemu_mgmt.orchestrate.processes import ProcessLauncher, RemoteLauncher

RUN_AS = "nobody" if os.geteuid() == 0 else None


def launchers() -> dict[str, RemoteLauncher]:
    out: dict[str, RemoteLauncher] = {"plain": ProcessLauncher(RUN_AS)}
    if os.geteuid() == 0 and shutil.which("bwrap"):
        from mpqemu_mgmt.orchestrate.confined import ConfinedLauncher

        out["confined"] = ConfinedLauncher()
    return out


def root() -> Path:
    path = Path(tempfile.mkdtemp(prefix="mpqb-", dir="/tmp"))
    path.chmod(0o711)
    return path


def summary(samples: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples)
    return {"n": len(ms), "median_ms": round(statistics.median(ms), 1),
            "p90_ms": round(ms[max(0, math.ceil(len(ms) * 0.9) - 1)], 1), "max_ms": round(ms[-1], 1)}


async def bench_attach(name: str, launcher: RemoteLauncher, backend: str, rounds: int) -> dict[str, float]:
    state = root()
    driver = DirectDriver(state, run_as=RUN_AS, launcher=launcher)
    runtime = await driver.start(parse_spec(f'name = "b{backend[0]}"\nmemory = "128M"\n'))
    samples: list[float] = []
    steps: list[list[float]] = []
    try:
        await driver.pause(runtime)
        for i in range(rounds):
            dev = DeviceSpec(id=f"d{i}", model="pci-testdev", backend=backend)  # type: ignore[arg-type]
            t0 = time.perf_counter()
            await driver.attach(runtime, dev)
            samples.append(time.perf_counter() - t0)
            assert driver.last_report is not None
            steps.append(driver.last_report.timings)
    finally:
        await driver.stop(runtime, force=True)
        shutil.rmtree(state, ignore_errors=True)
    out = summary(samples)
    # launch-remote (incl. first QMP answer) / getfd / device_add (= realize), medians
    for k, label in enumerate(("launch_ms", "getfd_ms", "device_add_ms")):
        out[label] = round(statistics.median(t[k] for t in steps) * 1000, 1)
    return out


async def bench_start16(launcher: RemoteLauncher, rounds: int) -> dict[str, float]:
    devices = "".join(
        f'[[device]]\nid = "d{i}"\nmodel = "pci-testdev"\nbackend = "{"builtin" if i % 2 else "qemu"}"\n'
        for i in range(16))
    samples = []
    for r in range(rounds):
        state = root()
        driver = DirectDriver(state, run_as=RUN_AS, launcher=launcher)
        spec = parse_spec(f'name = "s16r{r}"\nmemory = "128M"\n' + devices)
        t0 = time.perf_counter()
        runtime = await driver.start(spec)
        samples.append(time.perf_counter() - t0)
        status = await (await driver.channel(runtime)).execute("query-status", timeout=5)
        assert status["status"] == "running" and len(runtime.remotes) == 16
        await driver.stop(runtime, force=True)
        shutil.rmtree(state, ignore_errors=True)
    return summary(samples)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results: dict[str, object] = {}
    for lname, launcher in launchers().items():
        for backend in ("builtin", "qemu"):
            results[f"attach/{lname}/{backend}"] = await bench_attach(lname, launcher, backend, args.rounds)
        results[f"start16/{lname}"] = await bench_start16(launcher, max(1, args.rounds // 5))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for key, value in results.items():
            print(f"{key:28s} {value}")
        goal_attach = results.get("attach/confined/builtin") or results["attach/plain/builtin"]
        goal_start = results.get("start16/confined") or results["start16/plain"]
        assert isinstance(goal_attach, dict) and isinstance(goal_start, dict)
        stock = results.get("attach/confined/qemu") or results["attach/plain/qemu"]
        assert isinstance(stock, dict)
        print(f"ratio attach builtin/stock remote (median): "
              f"{goal_attach['median_ms'] / stock['median_ms']:.2f}")
        if "attach/confined/builtin" in results:
            plain = results["attach/plain/builtin"]
            assert isinstance(plain, dict)
            print(f"ratio attach confined/plain (builtin, median): "
                  f"{goal_attach['median_ms'] / plain['median_ms']:.2f}")
        print(f"goal attach ≤ 150 ms (confined builtin, median): {goal_attach['median_ms']} ms")
        print(f"goal 16 remotes start→running ≤ 3000 ms (median): {goal_start['median_ms']} ms")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
