"""Config-read round trip of the in-tree remote vs stock QEMU 7.2 x-remote (pci-testdev), as a ratio.

    .venv/bin/python bench/emulator_config_read.py [--rounds 15] [--batch 500] [--seccomp enforce]

Two clients, the same for both remotes: ProxySim (the project's proxy-role client, Python: its
own cost is common to both sides and dilutes the ratio) and a raw client that writes the 28 request
bytes and reads the 24 reply bytes (closest to QEMU's C proxy, so the ratio shows the remotes'
own cost). Batches alternate between the two remotes so the noise of a shared machine hits both
alike; the figure is the median batch mean. Goal: ours / stock ≤ 0.85. Also printed: a 1-byte
BAR read (address decode + model) through ProxySim.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

from mpqemu_mgmt.protocol import BarRead, Message, PciConfigRead
from mpqemu_mgmt.testing.builtin_remote import BuiltinRemote
from mpqemu_mgmt.testing.proxysim import ProxySim
from mpqemu_mgmt.testing.stock_remote import StockRemote, settle

RAW_CFGREAD = struct.pack("<i4xQIIi", 3, 12, 0, 0, 4)  # PCI_CFGREAD of the vendor/device dword


def raw_batch(sock: socket.socket, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        sock.sendall(RAW_CFGREAD)
        got = 0
        while got < 24:  # RET header + u64
            chunk = sock.recv(64)
            if not chunk:
                raise ConnectionError("remote closed")
            got += len(chunk)
    return (time.perf_counter() - t0) / n


def batch(px: ProxySim, msg: Message, n: int) -> float:
    request = px.request
    t0 = time.perf_counter()
    for _ in range(n):
        request(msg)
    return (time.perf_counter() - t0) / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--seccomp", default="enforce", choices=("enforce", "log", "errno", "off"))
    args = p.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="mpqemu-bench-") as tmp,
        StockRemote.pair("pci-testdev", workdir=Path(tmp), qmp=True, name="stock") as (stock, s_sock),
        BuiltinRemote.pair("pci-testdev", workdir=Path(tmp), seccomp=args.seccomp) as (_ours, o_sock),
        ProxySim(s_sock) as ps,
        ProxySim(o_sock) as po,
    ):
        settle(stock)
        for px in (ps, po):
            px.map_bars()
        kinds: dict[str, Message] = {
            "config_read": PciConfigRead(0, 4),
            "bar_read": BarRead(ps.bar_address(0, 0)[0], 1, True),
        }
        res: dict[tuple[str, str], list[float]] = {}
        for msg in kinds.values():
            for px in (ps, po):
                batch(px, msg, 200)  # warm-up
        for r in range(args.rounds):
            for name, msg in kinds.items():
                order = ((ps, "stock"), (po, "ours")) if r % 2 == 0 else ((po, "ours"), (ps, "stock"))
                for px, who in order:
                    res.setdefault((name, who), []).append(batch(px, msg, args.batch))
        # the raw client last: it reads the sockets directly, behind ProxySim's back
        raw: dict[str, list[float]] = {"stock": [], "ours": []}
        raw_batch(s_sock, 200)
        raw_batch(o_sock, 200)
        for r in range(args.rounds):
            order = (
                ((s_sock, "stock"), (o_sock, "ours")) if r % 2 == 0 else ((o_sock, "ours"), (s_sock, "stock"))
            )
            for sock, who in order:
                raw[who].append(raw_batch(sock, args.batch))
    print(
        f"mpqemu round trip, pci-testdev, ours with --seccomp {args.seccomp}; "
        f"median of {args.rounds} batches x {args.batch}"
    )
    for name in kinds:
        s = statistics.median(res[(name, "stock")]) * 1e6
        o = statistics.median(res[(name, "ours")]) * 1e6
        print(
            f"  {name:12s} stock {s:7.1f} us   ours {o:7.1f} us   ratio ours/stock {o / s:5.2f}  (ProxySim)"
        )
    s = statistics.median(raw["stock"]) * 1e6
    o = statistics.median(raw["ours"]) * 1e6
    name = "config_read"
    print(f"  {name:12s} stock {s:7.1f} us   ours {o:7.1f} us   ratio ours/stock {o / s:5.2f}  (raw client)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
