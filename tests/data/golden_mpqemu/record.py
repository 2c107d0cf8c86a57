"""Record golden mpqemu traffic between a stock x-pci-proxy-dev and a stock x-remote (QEMU 7.2).

    .venv/bin/python tests/data/golden_mpqemu/record.py [--seconds 3] [--out PATH]

A relay sits between the two stock processes and passes every frame on byte for byte with its fds
(the memfds and eventfds must reach the remote). The guest (``-machine pc -accel tcg`` with memfd
RAM, no disk) boots SeaBIOS for a few seconds; then the proxy's monitor reads and writes the BARs
(``xp``, ``i``, ``o``) and resets the machine. Every frame is stored in order, with its direction,
hex bytes and fd count, in ``pci-testdev-boot.json``. This is a tool to regenerate test data; the
tests only read the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from mpqemu_mgmt.remote.transport import Transport
from mpqemu_mgmt.testing.stock_remote import DEFAULT_QEMU, StockRemote

HERE = Path(__file__).resolve().parent


def _relay(src: socket.socket, dst: socket.socket, direction: str, log: list[dict[str, Any]],
           lock: threading.Lock) -> None:
    rx, tx = Transport(src), Transport(dst)
    try:
        while True:
            frame = rx.read_raw_frame()
            if frame is None:
                break
            data, fds = frame
            with lock:
                log.append({"dir": direction, "hex": data.hex(), "nfds": len(fds)})
            try:
                tx.send_raw(data, fds.numbers())
            finally:
                fds.close()
    except OSError:
        pass
    finally:
        # Propagate the close so the other side sees EOF.
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def _qmp(path: Path, *commands: tuple[str, dict[str, Any]]) -> list[Any]:
    conn = socket.socket(socket.AF_UNIX)
    conn.settimeout(20)
    for _ in range(200):
        try:
            conn.connect(str(path))
            break
        except OSError:
            time.sleep(0.05)
    out: list[Any] = []
    with conn, conn.makefile("rwb") as f:
        f.readline()
        for name, args in (("qmp_capabilities", {}), *commands):
            f.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
            f.flush()
            while True:
                msg = json.loads(f.readline())
                if "return" in msg or "error" in msg:
                    out.append(msg.get("return", msg.get("error")))
                    break
    return out[1:]


def hmp(line: str) -> tuple[str, dict[str, Any]]:
    return ("human-monitor-command", {"command-line": line})


def record(seconds: float, workdir: Path) -> list[dict[str, Any]]:
    log: list[dict[str, Any]] = []
    lock = threading.Lock()
    proxy_q, relay_p = socket.socketpair()
    relay_r, remote_end = socket.socketpair()
    qmp_path = workdir / "proxy.qmp"
    with StockRemote("pci-testdev,id=t0", remote_end.detach(), workdir=workdir) as remote:
        argv = [
            DEFAULT_QEMU, "-machine", "pc,accel=tcg", "-m", "128", "-nodefaults", "-display", "none",
            "-object", "memory-backend-memfd,id=mem,size=128M", "-machine", "memory-backend=mem",
            "-device", f"x-pci-proxy-dev,id=t0,fd={proxy_q.fileno()}",
            "-qmp", f"unix:{qmp_path},server=on,wait=off",
        ]
        threads = [
            threading.Thread(target=_relay, args=(relay_p, relay_r, "to_remote", log, lock), daemon=True),
            threading.Thread(target=_relay, args=(relay_r, relay_p, "to_proxy", log, lock), daemon=True),
        ]
        for t in threads:
            t.start()
        with open(workdir / "proxy.log", "wb") as plog:
            proxy = subprocess.Popen(argv, pass_fds=(proxy_q.fileno(),), stdout=plog, stderr=plog)
            proxy_q.close()
            try:
                time.sleep(seconds)
                pci = _qmp(qmp_path, ("query-pci", {}))[0]
                dev = next(d for b in pci for d in b["devices"] if d.get("qdev_id") == "t0")
                bars = {b["bar"]: b for b in dev["regions"]}
                mem, io = bars[0]["address"], bars[1]["address"]
                _qmp(
                    qmp_path,
                    hmp(f"o /b {io:#x} 0"),       # select test 3 (portio-no-eventfd)
                    hmp(f"xp /16bx {mem:#x}"),    # 16 one-byte BAR_READs of the header
                    hmp(f"i /l {io + 4:#x}"),     # the test's port offset, 4 bytes
                    hmp(f"o /b {io + 128 + 3:#x} 0xfa"),  # a counted write
                    hmp(f"i /w {io + 12:#x}"),
                    ("system_reset", {}),
                )
                time.sleep(1.0)
            finally:
                proxy.terminate()
                proxy.wait(10)
        for t in threads:
            t.join(5)
        print(remote.log_text(), file=sys.stderr)
    relay_p.close()
    relay_r.close()
    return log


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--out", type=Path, default=HERE / "pci-testdev-boot.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        frames = record(args.seconds, Path(tmp))
    doc = {
        "source": "stock qemu-system-x86_64 7.2 x-pci-proxy-dev (pc, tcg, memfd RAM, SeaBIOS, no disk) "
        "<-> stock x-remote pci-testdev, relayed by tests/data/golden_mpqemu/record.py",
        "frames": frames,
    }
    args.out.write_text(json.dumps(doc, indent=0) + "\n")
    counts: dict[str, int] = {}
    for f in frames:
        key = f"{f['dir']}:{int.from_bytes(bytes.fromhex(f['hex'][:8]), 'little')}"
        counts[key] = counts.get(key, 0) + 1
    print(f"{len(frames)} frames -> {args.out}: {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
