"""Fuzz campaign for the vfio-user server: hostile clients against the real serve loop and models.

One command runs the whole campaign (at least 100,000 messages by default)::

    python -m mpqemu_mgmt.testing.fuzz_vfio_user --messages 100000 --seed 1 [--target process]

``--target process`` serves each session from the real confined remote process (seccomp enforce)
instead of a thread: a seccomp kill, a crash or a traceback is a finding, and the remote's fd
count is sampled to catch leaked fds.

Each session serves one model (pci-testdev, edu, virtio-blk in turn) on a socketpair, the server
in a thread of this process, and a client sends a mix of well-formed commands (VERSION first, DMA
windows over memfds, eventfds, region accesses, resets), structure-aware mutations of them (flipped
bits, cut or grown payloads, wrong fd counts, bogus commands and flags) and, rarely, broken frames
that must end the session. It answers the server's DMA_READ/DMA_WRITE requests as QEMU would.

Pass criteria, checked after every session and at the end:

* no crash: the server thread ends only by a clean return (client closed) or by ProtocolError
  after a broken frame; any other exception is a finding;
* the server answered every command that asked for an answer (one reply per command, in order);
* no fd leak: this process's open fds are the same before and after the campaign.

It also runs a short slice from the test suite (tests/integration/test_vfio_user_fuzz.py).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gc
import json
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from mpqemu_mgmt.errors import ProtocolError, TruncatedMessage
from mpqemu_mgmt.protocol.vfio_user import codec, wire
from mpqemu_mgmt.protocol.vfio_user import messages as m
from mpqemu_mgmt.protocol.vfio_user.wire import Command, Header
from mpqemu_mgmt.remote.vfio_user_serve import serve_vfio_user
from mpqemu_mgmt.testing.logged_process import wait_or_kill
from mpqemu_mgmt.testing.vfio_user_client import QEMU_CAPABILITIES, VfioUserClient

MODELS = ("pci-testdev", "edu", "virtio-blk")
RAM = 1 << 20


@dataclass
class Report:
    messages: int = 0
    sessions: int = 0
    replies: int = 0
    error_replies: int = 0
    fatal_frames: int = 0
    dma_requests: int = 0
    fds_sent: int = 0
    crashes: list[str] = field(default_factory=list)
    fd_leak: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.crashes and not self.fd_leak

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["ok"] = self.ok
        out["messages_per_second"] = round(self.messages / self.seconds) if self.seconds else 0
        return out


def _open_fds() -> set[str]:
    """The fds open in this process, without the listing's own directory fd.

    os.listdir opens /proc/self/fd itself, at the lowest free number, and that number shows in
    the listing; it is closed again before listdir returns, so it is dropped here (F_GETFD fails).
    Otherwise a before/after comparison names that transient number instead of the real change.
    """
    out = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            fcntl.fcntl(int(name), fcntl.F_GETFD)
            out.add(name)
    return out


class _Session:
    #: fds a healthy remote may hold beyond its start-up set: one per DMA window (mmap keeps a
    #: dup) and the IRQ eventfds; anything above means received fds are being leaked
    FD_SLACK = 64 + 8

    def __init__(
        self, model: str, rng: random.Random, report: Report, backing_path: str, target: str = "thread"
    ) -> None:
        self.rng = rng
        self.report = report
        self.model = model
        self.target = target
        self.ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.backing = open(backing_path, "r+b", buffering=0) if model == "virtio-blk" else None  # noqa: SIM115
        self.result: dict[str, BaseException | int] = {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.fd_base = 0
        self.fd_peak = 0
        if target == "process":
            argv = [sys.executable, "-m", "mpqemu_mgmt.remote", "--device", model, "--fd",
                    str(self.ours.fileno()), "--transport", "vfio-user", "--seccomp", "enforce"]
            keep = [self.ours.fileno()]
            if self.backing is not None:
                argv += ["--backing-fd", str(self.backing.fileno())]
                keep.append(self.backing.fileno())
            self.proc = subprocess.Popen(argv, pass_fds=keep, stderr=subprocess.PIPE)
            self.ours.close()
            self.thread = threading.Thread(target=lambda: None, daemon=True)
        else:
            self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        theirs.settimeout(10)
        self.client = VfioUserClient(theirs)
        self.memfd = os.memfd_create("fuzz-ram", os.MFD_CLOEXEC)
        os.ftruncate(self.memfd, RAM)
        self.next_id = 0
        self.closed = False

    def _serve(self) -> None:
        try:
            self.result["rc"] = serve_vfio_user(self.ours, self.model, backing=self.backing)
        except BaseException as exc:  # a finding unless it is the expected end of a broken frame
            self.result["exc"] = exc
        finally:
            self.ours.close()

    # -- message generation -------------------------------------------------------------------

    def _valid(self) -> tuple[Any, tuple[int, ...]]:
        r = self.rng
        kind = r.randrange(14)
        if kind == 12:  # enable decode and bus mastering, so DMA engines really run
            return m.RegionWrite(wire.REGION_CONFIG, 4, r.choice([b"\x07\x00", b"\x06\x04"])), ()
        if kind == 13:  # edu's DMA registers / virtio-blk's queue PFN and notify
            reg = r.choice([0x80, 0x88, 0x90, 0x98, 0x08, 0x10])
            value = {
                0x80: r.choice([0x1000, 0x40000]),
                0x88: r.choice([0x40000, 0x1000]),
                0x90: r.choice([64, 4096, 5000]),
                0x98: r.choice([1, 3, 5, 7]),
            }.get(reg, r.randrange(1 << 20))
            return m.RegionWrite(0, reg, value.to_bytes(8 if reg >= 0x80 else 4, "little")), ()
        if kind == 0:
            return m.Version(0, r.choice([0, 0, 1]), dict(QEMU_CAPABILITIES)), ()
        if kind == 1:
            size = r.choice([4096, 65536, RAM])
            addr = r.choice([0, 0x10000, r.randrange(0, 1 << 32, 4096)])
            if r.random() < 0.6:
                return m.DmaMap(3, 0, addr, size), (self.memfd,)
            return m.DmaMap(3, 0, addr, size), ()
        if kind == 2:
            return m.DmaUnmap(0, r.choice([0, 0x10000]), r.choice([4096, 65536, RAM])), ()
        if kind == 3:
            return m.DeviceInfoRequest(), ()
        if kind == 4:
            return m.RegionInfoRequest(r.randrange(11)), ()
        if kind == 5:
            return m.IrqInfoRequest(r.randrange(7)), ()
        if kind == 6:
            action = r.choice(
                [wire.IRQ_SET_ACTION_MASK, wire.IRQ_SET_ACTION_UNMASK, wire.IRQ_SET_ACTION_TRIGGER]
            )
            data = r.choice([wire.IRQ_SET_DATA_NONE, wire.IRQ_SET_DATA_BOOL, wire.IRQ_SET_DATA_EVENTFD])
            index, count = r.randrange(6), r.choice([0, 1, 1, 2])
            if data == wire.IRQ_SET_DATA_EVENTFD:
                n = r.choice([0, count])
                fds = tuple(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in range(n))
                return m.SetIrqs(data | action, index, 0, count, (), fds), fds
            bools = tuple(r.random() < 0.7 for _ in range(count)) if data == wire.IRQ_SET_DATA_BOOL else ()
            return m.SetIrqs(data | action, index, 0, count, bools), ()
        if kind in (7, 8):
            region = r.choice([0, 0, 1, 7, 7, r.randrange(12)])
            size = r.choice([1, 2, 4, 8, r.randrange(0, 300)])
            offset = r.choice([0, 4, 0x10, 0x20, 0x24, 0x60, 0x80, 0x98, r.randrange(0, 1 << 21)])
            if kind == 7:
                return m.RegionRead(region, offset, size), ()
            return m.RegionWrite(region, offset, r.randbytes(size)), ()
        if kind == 9:
            writes = tuple(
                m.RegionWrite(r.choice([0, 1, 7]), r.randrange(256), r.randbytes(r.choice([1, 2, 4, 8])))
                for _ in range(r.randrange(5))
            )
            return m.RegionWriteMulti(writes), ()
        if kind == 10:
            return m.DeviceReset(), ()
        return m.Unsupported(r.choice([6, 14, 16, 17, 18]), b""), ()

    def _message(self) -> tuple[bytes, tuple[int, ...], bool, bool]:
        """(bytes, fds, expects a reply, frame is broken)."""
        r = self.rng
        body, fds = self._valid()
        msg_id = self.next_id
        self.next_id = (self.next_id + 1) & 0xFFFF
        if isinstance(body, m.Unsupported):
            payload = r.randbytes(r.randrange(16))
            command = body.command
        else:
            payload = body.pack()
            command = int(body.command if isinstance(body, m.Empty) else body.COMMAND)
        flags = 0
        no_reply = r.random() < 0.05
        if no_reply:
            flags |= wire.FLAG_NO_REPLY
        roll = r.random()
        broken = False
        if roll < 0.35:  # structure-aware mutation of a valid message
            buf = bytearray(payload)
            op = r.randrange(6)
            if op == 0 and buf:
                for _ in range(r.randrange(1, 4)):
                    i = r.randrange(len(buf))
                    buf[i] ^= 1 << r.randrange(8)
            elif op == 1 and buf:
                del buf[r.randrange(len(buf)) :]
            elif op == 2:
                buf += r.randbytes(r.randrange(1, 64))
            elif op == 3:
                command = r.choice([0, 11, 12, 19, 255, r.randrange(1 << 16)])
            elif op == 4:
                flags |= r.choice([wire.FLAG_ERROR, 0x40, 0x80000000])
            else:
                fds = (*fds, os.eventfd(0, os.EFD_CLOEXEC))
            payload = bytes(buf)
        elif roll < 0.3512:  # a frame that must end the session
            broken = True
            kind = r.randrange(3)
            if kind == 0:
                return wire.HEADER.pack(msg_id, command, r.randrange(0, 16), 0, 0), fds, False, True
            if kind == 1:
                return wire.HEADER.pack(msg_id, command, 1 << r.randrange(22, 32), 0, 0), fds, False, True
            return wire.HEADER.pack(msg_id, command, 16, r.randrange(2, 16), 0), fds, False, True
        raw = Header(msg_id, command & 0xFFFF, 16 + len(payload), flags, 0).pack() + payload
        return raw, fds, not no_reply, broken

    # -- driving --------------------------------------------------------------------------------

    def _await_reply(self, msg_id: int) -> None:
        while True:
            header, payload, rfds = self.client.recv()
            for fd in rfds:
                os.close(fd)
            if header.is_reply:
                if header.msg_id != msg_id:
                    raise AssertionError(f"reply {header.msg_id} while waiting for {msg_id}")
                self.report.replies += 1
                if header.is_error:
                    self.report.error_replies += 1
                return
            # the server's DMA_READ/DMA_WRITE: answer as QEMU would (or refuse, sometimes)
            self.report.dma_requests += 1
            if self.rng.random() < 0.1:
                self.client.send_raw(codec.encode_error(header.msg_id, header.command, wire.EFAULT))
                continue
            try:
                req = codec.decode_server_request(header, payload)
            except ProtocolError:
                self.client.send_raw(codec.encode_error(header.msg_id, header.command, wire.EINVAL))
                continue
            if isinstance(req, m.DmaRead):
                body: Any = m.DmaReadReply(req.address, self.rng.randbytes(req.count))
            else:
                body = m.DmaWriteReply(req.address, len(req.data)) if self.rng.random() < 0.5 else m.Empty(
                    Command.DMA_WRITE
                )
            self.client.send_raw(codec.encode(header.msg_id, body, reply=True))

    def _edu_dma_by_message(self) -> int:
        """A DMA that must go by DMA_READ/DMA_WRITE messages, to put that path under the fuzz."""
        c = self.client
        c.map_inband(0, 1 << 16)
        c.config_write(4, 2, 0x6)
        direction = self.rng.choice([(0x1000, 0x40000, 1), (0x40000, 0x2000, 3)])
        for reg, value in zip((0x80, 0x88, 0x90, 0x98), (*direction[:2], 64, direction[2]), strict=True):
            c.write(0, reg, 8, value)
        time.sleep(0.11)  # edu starts the transfer 100 ms after the command
        before = c.dma_served
        c.read(0, 0x98, 8)  # the server serves the DMA first, then this read
        self.report.dma_requests += c.dma_served - before
        return 8

    def run(self, budget: int) -> int:
        sent = 0
        self.client.handshake()
        sent += 1
        self.fd_base = self._remote_fds()
        if self.model == "edu" and self.rng.random() < 0.5:
            sent += self._edu_dma_by_message()
        while sent < budget:
            raw, fds, expects, broken = self._message()
            msg_id = struct.unpack_from("<H", raw)[0]
            try:
                self.client.send_raw(raw, fds)
            except OSError:
                break
            finally:
                self.report.fds_sent += len(fds)
                for fd in fds:
                    if fd != self.memfd:
                        os.close(fd)
            sent += 1
            if self.proc is not None and sent % 200 == 0:
                self.fd_peak = max(self.fd_peak, self._remote_fds())
            if self.rng.random() < 0.0005:
                time.sleep(0.12)  # let device timers (edu's 100 ms DMA) fire mid-session
            if broken:
                self.report.fatal_frames += 1
                break
            if expects:
                try:
                    self._await_reply(msg_id)
                except (TruncatedMessage, OSError) as exc:
                    raise AssertionError(f"server went away without a broken frame: {exc}") from exc
        return sent

    def _remote_fds(self) -> int:
        if self.proc is None:
            return 0
        try:
            return len(os.listdir(f"/proc/{self.proc.pid}/fd"))
        except OSError:
            return 0

    def close(self) -> None:
        self.client.close()
        if self.proc is not None:
            if not wait_or_kill(self.proc, 20):
                self.report.crashes.append(f"{self.model}: remote process hung after the client closed")
            rc = self.proc.returncode
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
            if self.proc.stderr:
                self.proc.stderr.close()
            # 0: client closed; 1: protocol error after a broken frame. A signal (SIGSYS from
            # seccomp, SIGSEGV) or a traceback is a finding.
            if rc not in (0, 1) or "Traceback" in err:
                self.report.crashes.append(f"{self.model}: remote exited {rc}: {err[-1500:]}")
            if self.fd_base and self.fd_peak > self.fd_base + self.FD_SLACK:
                self.report.fd_leak.append(f"{self.model}: remote fds {self.fd_base} -> peak {self.fd_peak}")
        self.thread.join(10)
        os.close(self.memfd)
        if self.backing is not None:
            self.backing.close()
        if self.thread.is_alive():
            self.report.crashes.append(f"{self.model}: server thread did not stop")
            return
        exc = self.result.get("exc")
        if exc is not None and not isinstance(exc, ProtocolError):
            text = "".join(traceback.format_exception(exc))  # type: ignore[arg-type]
            self.report.crashes.append(f"{self.model}: {text}")


def run_campaign(
    messages: int = 100_000, seed: int = 1, session_len: int = 4000, target: str = "thread"
) -> Report:
    """``target``: "thread" (server in this process, fastest) or "process" (the real remote,
    ``python -m mpqemu_mgmt.remote --transport vfio-user --seccomp enforce``, one per session)."""
    rng = random.Random(seed)
    report = Report()
    start = time.monotonic()
    with tempfile.NamedTemporaryFile(prefix="fuzz-vfio-user-", suffix=".img") as disk:
        disk.truncate(1 << 20)
        disk.flush()
        # Garbage that earlier code (an earlier test in the same pytest process) left in a
        # reference cycle may own an open fd, which the cyclic collector would close at whatever
        # allocation triggers it, i.e. in the middle of this campaign: a "closed:N" that is not
        # ours. Collect it now, so the accounting below sees only what the campaign does.
        gc.collect()
        before = _open_fds()
        while report.messages < messages:
            model = MODELS[report.sessions % len(MODELS)]
            session = _Session(model, rng, report, disk.name, target)
            report.sessions += 1
            try:
                report.messages += session.run(min(session_len, messages - report.messages + 1))
            except AssertionError as exc:
                report.crashes.append(f"{model}: {exc}")
            finally:
                session.close()
            if len(report.crashes) > 5:
                break
        after = _open_fds()
        # /proc/self/fd itself may show a transient fd of the listing; compare with one retry
        if after != before:
            time.sleep(0.1)
            after = _open_fds()
        if after != before:
            report.fd_leak = sorted(
                f"{fd}->{_readlink(fd)}" for fd in after - before
            ) + [f"closed:{fd}" for fd in before - after]
    report.seconds = round(time.monotonic() - start, 2)
    return report


def _readlink(fd: str) -> str:
    with contextlib.suppress(OSError):
        return os.readlink(f"/proc/self/fd/{fd}")
    return "?"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpqemu_mgmt.testing.fuzz_vfio_user")
    p.add_argument("--messages", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--session-len", type=int, default=4000)
    p.add_argument("--target", choices=("thread", "process"), default="thread")
    args = p.parse_args(argv)
    report = run_campaign(args.messages, args.seed, args.session_len, args.target)
    json.dump(report.to_dict(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
