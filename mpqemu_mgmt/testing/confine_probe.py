"""A stand-in remote for the confinement proof tests: same argv as ``python -m mpqemu_mgmt.remote``.

It does what a remote does before serving (imports, wraps its inherited fds, then
:func:`~mpqemu_mgmt.confine.lockdown.lock_down`), then obeys one JSON command per line on the
device socket and answers ``{"ok": true, "result": ...}`` or ``{"ok": false, "errno": "EPERM"}``.
Commands try forbidden things (open, socket, fork, exec, kill, connect) and the steady-state
things a device does (mmap a memfd received over SCM_RIGHTS, write an eventfd, accept and answer
on the QMP listening fd, run a thread), so tests see kills, errnos and audit records.

Test support only: never used by the service. Must not open anything itself after lock_down.
"""

from __future__ import annotations

import argparse
import errno
import json
import mmap
import os
import selectors
import socket
import sys
import threading
import time
from typing import Any

from mpqemu_mgmt.confine.lockdown import lock_down
from mpqemu_mgmt.remote.scm import fds_from_ancillary


def _do(cmd: dict[str, Any], sock: socket.socket, qmp: socket.socket) -> Any:
    op = cmd["op"]
    if op == "ping":
        return "pong"
    if op == "ids":
        return {"uid": os.getuid(), "gid": os.getgid(), "pid": os.getpid(), "ppid": os.getppid()}
    if op == "open":
        fd = os.open(cmd["path"], os.O_RDONLY)
        os.close(fd)
        return "opened"
    if op == "listdir":
        return sorted(os.listdir(cmd["path"]))
    if op == "socket_inet":
        socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()
        return "created"
    if op == "connect_tcp":
        with socket.create_connection(("127.0.0.1", int(cmd["port"])), timeout=2):
            return "connected"
    if op == "connect_abstract":
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect("\0" + cmd["name"])
            return "connected"
    if op == "ifnames":
        return [name for _, name in socket.if_nameindex()]
    if op == "kill":
        os.kill(int(cmd["pid"]), 0)
        return "signalled"
    if op == "fork":
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        return "forked"
    if op == "exec":
        os.execv("/usr/bin/true", ["true"])
    if op == "mmap_exec":
        m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_EXEC)
        m.close()
        return "mapped"
    if op == "thread":
        box: list[int] = []
        t = threading.Thread(target=lambda: box.append(sum(range(1000))))
        t.start()
        t.join(5)
        return box[0]
    if op == "memfd":
        # the steady state of SYNC_SYSMEM: receive a RAM fd, map it shared, touch it
        _msg, anc, _, _ = sock.recvmsg(16, socket.CMSG_SPACE(4 * 4))
        fds = fds_from_ancillary(anc)
        try:
            size = os.fstat(fds[0]).st_size
            with mmap.mmap(fds[0], size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as ram:
                ram[0] = (ram[0] + 1) % 256
                value = ram[0]
            if len(fds) > 1:  # an irqfd: signal it as INTx assert does
                os.write(fds[1], (1).to_bytes(8, "little"))
        finally:
            for fd in fds:
                os.close(fd)
        return value
    if op == "qmp":
        # answer one QMP client on the inherited listening fd, as the remote's monitor does
        conn, _ = qmp.accept()
        with conn:
            conn.sendall(json.dumps({"QMP": {"version": {}, "capabilities": []}}).encode() + b"\r\n")
            conn.settimeout(5)
            data = conn.recv(4096)
            conn.sendall(json.dumps({"return": {"echo": data.decode().strip()}}).encode() + b"\r\n")
            conn.shutdown(socket.SHUT_RDWR)
        return "served"
    if op == "sleep":
        time.sleep(float(cmd.get("seconds", 0.1)))
        return "slept"
    if op == "abort":
        os.abort()
    if op == "raise":
        raise RuntimeError("probe: deliberate uncaught exception")
    if op == "exit":
        sys.exit(int(cmd.get("code", 0)))
    raise ValueError(f"unknown op {op!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="confine_probe")
    parser.add_argument("--device", required=True)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--qmp-fd", type=int, required=True)
    parser.add_argument("--backing-fd", type=int)
    parser.add_argument("--readonly", action="store_true")
    parser.add_argument("--transport", default="mpqemu")
    parser.add_argument("--seccomp", default="enforce")
    args = parser.parse_args(argv)
    sock = socket.socket(fileno=args.fd)
    qmp = socket.socket(fileno=args.qmp_fd)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    reader = sock.makefile("rb", buffering=0)
    lock_down(args.device, args.seccomp)
    while True:
        selector.select(timeout=None)
        line = reader.readline()
        if not line:
            return 0  # the peer closed: exit 0, as the remote does (Contracts 1)
        cmd = json.loads(line)
        try:
            reply: dict[str, Any] = {"ok": True, "result": _do(cmd, sock, qmp)}
        except OSError as exc:
            reply = {"ok": False, "errno": errno.errorcode.get(exc.errno or 0, str(exc.errno))}
        except (KeyError, ValueError, TypeError) as exc:  # a malformed command, not a probe result
            reply = {"ok": False, "error": repr(exc)}
        sock.sendall(json.dumps(reply).encode() + b"\n")


if __name__ == "__main__":
    sys.exit(main())
