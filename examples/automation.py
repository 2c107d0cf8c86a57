#!/usr/bin/env python3
"""OpenStack-style automation on top of ``mpqemu-mgmt --format json``.

The way a compute agent would drive mpqemu-mgmt: every step is an *ensure* (define, start,
attach, healthy; stop, undefine), decided only from the JSON the CLI prints and its exit code,
so running it twice is safe: the second run reports ``changed: false`` everywhere.

    examples/automation.py up   --spec examples/demo.toml --device id=t1,model=pci-testdev
    examples/automation.py check --name demo
    examples/automation.py down --name demo

Exit status: 0 done; 1 a step failed (its error object is printed); 2 bad usage.
Needs a running service (``mpqemu-mgmt serve``); ``--state-dir`` is passed through.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
import tomllib
from typing import Any


class StepFailed(Exception):
    def __init__(self, step: str, error: Any) -> None:
        super().__init__(step)
        self.step = step
        self.error = error


class Cli:
    def __init__(self, command: list[str], state_dir: str | None) -> None:
        self.base = [*command, "--format", "json"] + (["--state-dir", state_dir] if state_dir else [])

    def __call__(self, step: str, *args: str, ok_codes: tuple[int, ...] = (0,)) -> Any:
        p = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=300, check=False)
        try:
            data = json.loads(p.stdout) if p.stdout.strip() else None
        except ValueError:
            data = {"raw": p.stdout}
        if p.returncode not in ok_codes:
            raise StepFailed(step, data or {"exit_code": p.returncode, "stderr": p.stderr.strip()})
        return data


def report(step: str, **fields: Any) -> None:
    print(json.dumps({"step": step, **fields}, sort_keys=True), flush=True)


def device_pairs(text: str) -> list[str]:
    return [p for p in text.split(",") if p]


def up(cli: Cli, spec_path: str, devices: list[str], health_timeout: float) -> str:
    with open(spec_path, "rb") as f:
        name = str(tomllib.load(f)["name"])
    # Ensure defined. A guest that exists is left as it is: its definition now includes devices
    # attached since (the service refuses to redefine a running guest with a different spec).
    if any(g["name"] == name for g in cli("list", "list")):
        report("define", name=name, changed=False, exists=True)
    else:
        res = cli("define", "define", spec_path)
        report("define", name=name, changed=res["changed"])
    res = cli("start", "start", name)
    report("start", name=name, changed=res["changed"], state=res["state"])
    for dev in devices:
        pairs = device_pairs(dev)
        res = cli("attach", "attach", name, *pairs)
        report("attach", name=name, device=res["device"], changed=res["changed"])
    check(cli, name, health_timeout)
    return name


def check(cli: Cli, name: str, timeout: float) -> None:
    """Healthy = the guest runs and every device's remote answers its heartbeat."""
    deadline = time.monotonic() + timeout
    while True:
        st = cli("status", "status", name)
        health = {d["id"]: d["health"] for d in st["devices"]}
        if st["state"] == "running" and all(h == "healthy" for h in health.values()):
            report("health", name=name, state=st["state"], devices=health,
                   restarts={d["id"]: d["restarts"] for d in st["devices"]})
            return
        if time.monotonic() > deadline or st["state"] in ("crashed", "failed", "stopped", "defined"):
            raise StepFailed("health", {"state": st["state"], "devices": health})
        time.sleep(0.2)


def down(cli: Cli, name: str) -> None:
    # NotFound (exit 1 with error NotFoundError) means there is nothing to tear down.
    listing = cli("list", "list")
    if not any(g["name"] == name for g in listing):
        report("stop", name=name, changed=False)
        report("undefine", name=name, changed=False)
        return
    res = cli("stop", "stop", name, "--force")
    report("stop", name=name, changed=res["changed"])
    res = cli("undefine", "undefine", name)
    report("undefine", name=name, changed=res["changed"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("up", "check", "down"))
    ap.add_argument("--spec", help="guest spec (TOML), for up")
    ap.add_argument("--name", help="guest name, for check/down")
    ap.add_argument("--device", action="append", default=[], metavar="K=V,K=V",
                    help="a device to ensure attached (repeatable)")
    ap.add_argument("--state-dir")
    ap.add_argument("--cli", default="mpqemu-mgmt", help="the mpqemu-mgmt command (default: from PATH)")
    ap.add_argument("--health-timeout", type=float, default=30.0)
    a = ap.parse_args(argv)
    cli = Cli(shlex.split(a.cli), a.state_dir)
    try:
        if a.action == "up":
            if not a.spec:
                ap.error("up needs --spec")
            up(cli, a.spec, a.device, a.health_timeout)
        elif a.action == "check":
            if not a.name:
                ap.error("check needs --name")
            check(cli, a.name, a.health_timeout)
        else:
            if not a.name:
                ap.error("down needs --name")
            down(cli, a.name)
    except StepFailed as exc:
        report(exc.step, failed=True, error=exc.error)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
