"""CPU placement for benchmarks: the client on one CPU, the remotes it compares on another.

On this kind of virtual machine a round trip between two processes is bimodal (about 30 µs or
about 75 µs) depending on whether the scheduler happens to keep them on the same CPU, and a
process keeps its mode for its lifetime — enough to swing an ours/stock ratio from 0.4 to 3.
Pinning every remote to the same CPU, and the client to another, gives both sides the same
placement: the production one, where QEMU's vCPU thread and the remote run on different CPUs.
Only benchmarks use this; it does no IO beyond sched_setaffinity.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator


def placement(kind: str = "split") -> tuple[int, int] | None:
    """(client CPU, remote CPU) for ``split`` (two CPUs) or ``same`` (one), None for ``none``
    or when a split is asked for on a single usable CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if kind == "same":
        return (cpus[0], cpus[0])
    if kind == "split" and len(cpus) >= 2:
        return (cpus[0], cpus[1])
    return None


@contextlib.contextmanager
def children_on(cpu: int | None) -> Iterator[None]:
    """Processes spawned inside inherit affinity to ``cpu``; the caller's is restored after."""
    if cpu is None:
        yield
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def pin_self(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
