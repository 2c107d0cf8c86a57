"""Reading /proc: whether a process lives, its start time (which with its pid names it uniquely:
pids recycle) and the CPU it used. Read-only IO; must not signal or change anything (``kill(pid,
0)`` sends nothing).
"""

from __future__ import annotations

import os
from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat from field 3 (state) on, or None when the pid is gone."""
    if pid <= 0:
        return None
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    return raw[raw.rindex(")") + 2:].split()


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot), or None when the pid is gone."""
    rest = _stat_fields(pid)
    if rest is None or rest[0] == "Z":
        return None  # a zombie is gone for every purpose of ours
    return int(rest[19])


def pid_alive(pid: int) -> bool:
    """Does ``pid`` run? A zombie does not; one of another uid does (EPERM on kill 0)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as gone.
    rest = _stat_fields(pid)
    return rest is not None and rest[0] != "Z"


def proc_cpu_ticks(pid: int) -> int | None:
    """utime + stime of the whole process (fields 14 and 15), in clock ticks; None when gone."""
    rest = _stat_fields(pid)
    return None if rest is None else int(rest[11]) + int(rest[12])
