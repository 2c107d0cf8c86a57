"""procfs: liveness, start time and CPU of real processes (this one, a child, a zombie)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from mpqemu_mgmt.procfs import pid_alive, proc_cpu_ticks, proc_start_time


def test_this_process() -> None:
    me = os.getpid()
    assert pid_alive(me)
    start = proc_start_time(me)
    assert start is not None and start > 0
    ticks = proc_cpu_ticks(me)
    assert ticks is not None and ticks >= 0


def test_no_such_pids() -> None:
    for pid in (0, -1):
        assert not pid_alive(pid)
        assert proc_start_time(pid) is None and proc_cpu_ticks(pid) is None


def test_a_zombie_is_gone_but_its_cpu_is_still_readable() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while proc_start_time(child.pid) is not None and time.monotonic() < deadline:
        time.sleep(0.01)  # exited, not yet reaped: a zombie
    try:
        assert not pid_alive(child.pid)
        assert proc_start_time(child.pid) is None
        assert proc_cpu_ticks(child.pid) is not None  # the stat file is still there
    finally:
        child.wait()
    assert not pid_alive(child.pid) and proc_cpu_ticks(child.pid) is None  # reaped: gone


def test_cpu_ticks_grow_with_work() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.3: pass\ninput()"],
                             stdin=subprocess.PIPE)
    want = int(0.2 * os.sysconf("SC_CLK_TCK"))  # most of the 0.3 s of CPU it spins for
    try:
        deadline = time.monotonic() + 10
        while (proc_cpu_ticks(child.pid) or 0) < want and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (proc_cpu_ticks(child.pid) or 0) >= want
    finally:
        child.kill()
        child.wait()
