"""The serve loop's busy modes (serve.py): QMP stays answered while the proxy keeps the remote busy.

Two busy modes, each tested alone: adaptive polling (polling.py; the default) and, with polling
off (``--poll-us 0``), the hot blocking read.

While requests follow each reply within HOT_GAP the remote blocks in its socket read instead of
poll; the QMP monitor must still answer within a small bound (it is looked at every HOT_LOOK),
and once the proxy goes idle the loop returns to poll (QMP answered with no traffic at all).
The loop runs in a thread of this process with a long hot gap (so it stays hot), the requests come
back to back from another process, the monitor client is this test.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mpqemu_mgmt.devices import catalogue
from mpqemu_mgmt.devices.base import DeviceHost
from mpqemu_mgmt.remote.irq import EventfdIrq
from mpqemu_mgmt.remote.memory import MappedGuestMemory
from mpqemu_mgmt.remote.serve import Remote
from mpqemu_mgmt.remote.timers import TimerQueue

pytestmark = pytest.mark.timeout(60)

CFGREAD = struct.pack("<i4xQIIi", 3, 12, 0, 0, 4)  # PCI_CFGREAD of the vendor/device dword
RET = struct.pack("<i4xQQ", 1, 8, 0x00051B36)


@pytest.fixture(params=["hot-read", "adaptive-poll"])
def remote(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, str, Remote]]:
    """The serve loop in a thread, hot whenever a request follows a reply within 1 s.

    With that gap, a busy proxy keeps the loop hot for good, so QMP is served only by the
    periodic look (HOT_LOOK): the property under test.
    """
    path = str(tmp_path / "r.qmp")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    proxy, theirs = socket.socketpair()
    memory, irq, timers = MappedGuestMemory(), EventfdIrq(), TimerQueue()
    host = DeviceHost(memory=memory, irq=irq, timers=timers, backing=None, readonly=False)
    poll_window = 0.0 if request.param == "hot-read" else 100e-6
    remote = Remote(theirs, catalogue.create("pci-testdev", host), memory, irq, timers, hot_gap=1.0,
                    poll_window=poll_window)
    remote.attach_qmp(listener)
    rc: list[int] = []
    th = threading.Thread(target=lambda: rc.append(remote.run()), daemon=True)
    th.start()
    try:
        yield proxy, path, remote
    finally:
        proxy.close()
        th.join(10)
        remote.close()
        theirs.close()
    assert not th.is_alive() and rc == [0]


HAMMER = """
import socket, struct, sys, time
sock = socket.socket(fileno=int(sys.argv[1]))
sock.setblocking(True)
req, ret = bytes.fromhex(sys.argv[2]), bytes.fromhex(sys.argv[3])
n, end = 0, time.monotonic() + float(sys.argv[4])
while time.monotonic() < end:
    sock.sendall(req)
    got = b""
    while len(got) < 24:
        chunk = sock.recv(24 - len(got))
        if not chunk:
            sys.exit(3)
        got += chunk
    if got != ret:
        sys.exit(4)
    n += 1
print(n)
"""


def hammer(sock: socket.socket, seconds: float) -> subprocess.Popen[str]:
    """Back-to-back config reads from another process (no GIL shared with the monitor client)."""
    return subprocess.Popen(
        [sys.executable, "-c", HAMMER, str(sock.fileno()), CFGREAD.hex(), RET.hex(), str(seconds)],
        pass_fds=(sock.fileno(),), stdout=subprocess.PIPE, text=True,
    )


def qmp_status(path: str) -> tuple[str, float]:
    """Connect, negotiate, query-status; the status and the seconds it took."""
    t0 = time.monotonic()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.settimeout(5)
        c.connect(path)
        f = c.makefile("rwb")
        try:
            assert b"QMP" in f.readline()
            f.write(b'{"execute": "qmp_capabilities"}\n{"execute": "query-status", "id": 7}\n')
            f.flush()
            assert json.loads(f.readline()) == {"return": {}}
            reply = json.loads(f.readline())
        finally:
            f.close()
    assert reply["id"] == 7
    return reply["return"]["status"], time.monotonic() - t0


def test_qmp_answers_while_the_proxy_is_busy_and_when_it_is_idle(
    remote: tuple[socket.socket, str, Remote],
) -> None:
    sock, path, served = remote
    proc = hammer(sock, 1.5)
    try:
        time.sleep(0.3)
        took = []
        for _ in range(3):
            status, seconds = qmp_status(path)
            assert status == "running"
            took.append(seconds)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0
    assert int(out) > 5000  # the proxy really was busy (the loop hot) while QMP was served
    # looked at every HOT_LOOK (20 ms): a generous bound for a loaded 2-core host
    assert max(took) < 1.0, took
    if served.poll.max_window:  # the busy requests were found by polling
        assert served.poll.hits > 500, served.poll.status()
    else:  # it was the hot read that served them
        assert served.hot_reads > 1000 and served.poll.hits == 0
    time.sleep(0.1)  # idle: the hot read times out, the loop waits in poll
    status, seconds = qmp_status(path)
    assert status == "running" and seconds < 1.0
    sock.settimeout(10)  # the hammer made the shared file description blocking
    sock.sendall(CFGREAD)  # and the next request after idling is served
    assert sock.recv(64) == RET
