"""AdaptivePoll: how long the serve loop may poll the socket without sleeping after a reply.

Why: a remote that goes to sleep in poll/recvmsg after each reply pays a wake-up on every guest
access (on this project's 2-core host: ~30 us of a ~75 us round trip when the proxy's vCPU thread
and the remote run on different CPUs, which is how they run in production). QEMU's own answer for
its event loops is adaptive polling (util/aio-posix.c ``run_poll_handlers`` and
``adjust_polling_time``, the ``poll-max-ns`` / ``poll-grow`` / ``poll-shrink`` properties of
``-object iothread``): before blocking, try the handlers for up to ``poll_ns``; grow ``poll_ns``
when the event came soon after polling stopped, shrink it when it came much later. This mirrors
that rule for one socket.

The rule (pure; the clock is the caller's):
* the window starts at ``max_window`` (a guest that is probing its device is usually busy);
* an event that came within ``max_window`` of the reply, but after the window had closed, grows
  the window (doubled, at least :data:`GROW_START`, at most ``max_window``): polling longer would
  have caught it;
* from the :data:`SHRINK_AFTER`-th event in a row that came later than ``max_window`` (no hit,
  no near miss in between), each one halves the window (below :data:`GROW_START` it is 0): an
  idle guest costs no polling CPU after a few accesses.

Where it differs from QEMU: QEMU's default (``poll-shrink`` 0) drops to 0 after a single long
block. A virtio guest alternates a quick access (its ISR read, soon after the interrupt) with a
slow one (the next kick, after it has reaped and queued more), so that rule collapsed the window
on every kick and lost the ISR read's hit too (bench/virtio_blk.py: 850 hits in 10,580 messages,
window 0). Two long gaps in a row are what an idle guest looks like.

``max_window`` 0 turns polling off (``--poll-us 0``).
"""

from __future__ import annotations

from dataclasses import dataclass

#: the first non-zero window after growing from 0 (util/aio-posix.c starts from 4 us, too)
GROW_START = 4e-6

#: the remote's default ``--poll-us``. QEMU's iothread default ``poll-max-ns`` is 32 us, for C
#: peers; here the peer's next access after a reply takes longer (a guest's ISR read after an
#: interrupt came 60-100 us later in bench/virtio_blk.py), so the window is longer
DEFAULT_MAX_WINDOW = 200e-6

#: the largest ``--poll-us`` (and spec ``poll_us``) accepted: 10 ms of spinning per reply
MAX_POLL_US = 10_000

#: long gaps in a row before the window shrinks (see the module docstring)
SHRINK_AFTER = 2


@dataclass(slots=True)
class AdaptivePoll:
    """The current polling window, in seconds, and how it was used."""

    max_window: float = DEFAULT_MAX_WINDOW
    window: float = DEFAULT_MAX_WINDOW
    hits: int = 0  # events found while polling
    misses: int = 0  # windows that closed without an event
    long_gaps: int = 0  # events in a row that came later than max_window

    def __post_init__(self) -> None:
        if self.max_window < 0:
            raise ValueError(f"negative polling window {self.max_window!r}")
        self.window = min(self.window, self.max_window)

    def hit(self) -> None:
        """An event arrived while polling."""
        self.hits += 1
        self.long_gaps = 0

    def came_late(self, gap: float) -> None:
        """The event came ``gap`` seconds after the reply, when the window (maybe 0) had closed."""
        if self.window:
            self.misses += 1
        if gap <= self.max_window:
            self.long_gaps = 0
            self.window = min(self.max_window, max(GROW_START, self.window * 2))
            return
        self.long_gaps += 1
        if self.long_gaps >= SHRINK_AFTER:
            half = self.window / 2
            self.window = half if half >= GROW_START else 0.0

    def status(self) -> dict[str, float | int]:
        """For x-device-status: the window in microseconds and its hit/miss counts."""
        return {
            "max_us": round(self.max_window * 1e6, 1),
            "window_us": round(self.window * 1e6, 1),
            "hits": self.hits,
            "misses": self.misses,
        }
