"""TimerQueue: the one-shot timers a device model asks for, run by the serve loop between requests.

Implements :class:`~mpqemu_mgmt.devices.base.Timers` with a heap ordered by deadline. The clock is
injected (``time.monotonic`` in the remote, a manual clock in tests and the fuzz campaign), so this
module does no IO and never sleeps: the loop asks :meth:`timeout` how long it may block.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable


class TimerQueue:
    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._clock = clock
        # where an exception from a model's callback goes (the remote logs it and keeps serving,
        # as the dispatcher does for accesses); None re-raises
        self._on_error = on_error
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cancelled: set[int] = set()

    def call_later(self, delay: float, callback: Callable[[], None]) -> object:
        seq = next(self._seq)
        heapq.heappush(self._heap, (self._clock() + max(0.0, delay), seq, callback))
        return seq

    def cancel(self, handle: object) -> None:
        if isinstance(handle, int):
            self._cancelled.add(handle)

    def timeout(self) -> float | None:
        """Seconds until the next deadline (0 if one is due), or None when nothing is pending."""
        while self._heap and self._heap[0][1] in self._cancelled:
            self._cancelled.discard(heapq.heappop(self._heap)[1])
        if not self._heap:
            return None
        return max(0.0, self._heap[0][0] - self._clock())

    def run_due(self) -> int:
        """Run every callback whose deadline has passed; returns how many ran."""
        ran = 0
        now = self._clock()
        while self._heap and self._heap[0][0] <= now:
            _, seq, cb = heapq.heappop(self._heap)
            if seq in self._cancelled:
                self._cancelled.discard(seq)
                continue
            try:
                cb()
            except Exception as exc:
                if self._on_error is None:
                    raise
                self._on_error(exc)
            ran += 1
        return ran

    def __len__(self) -> int:
        return len(self._heap) - len(self._cancelled)

    def __bool__(self) -> bool:
        return bool(self._heap)
