"""Reading /proc: a process's start time, which with its pid names it uniquely (pids recycle).
Read-only IO; must not signal or change anything.
"""

from __future__ import annotations

from pathlib import Path


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot), or None when the pid is gone."""
    if pid <= 0:
        return None
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = raw[raw.rindex(")") + 2:].split()
    if rest[0] == "Z":
        return None  # a zombie is gone for every purpose of ours
    return int(rest[19])
