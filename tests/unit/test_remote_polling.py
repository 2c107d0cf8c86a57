"""AdaptivePoll: the busy-poll window grows when polling longer would have caught the next
request and shrinks to nothing for an idle guest (util/aio-posix.c adjust_polling_time)."""

from __future__ import annotations

import itertools

import pytest

from mpqemu_mgmt.remote.polling import DEFAULT_MAX_WINDOW, GROW_START, AdaptivePoll


def test_default_maximum_is_200_us() -> None:
    assert AdaptivePoll().max_window == DEFAULT_MAX_WINDOW == 200e-6


def test_starts_at_the_maximum() -> None:
    assert AdaptivePoll(100e-6, 100e-6).window == 100e-6


def test_zero_maximum_never_polls() -> None:
    poll = AdaptivePoll(0.0, 0.0)
    poll.came_late(1e-6)  # even a request right after the reply does not turn it on
    assert poll.window == 0.0 and poll.misses == 0


def test_an_idle_guest_shrinks_the_window_to_zero() -> None:
    poll = AdaptivePoll(100e-6, 100e-6)
    windows = []
    for _ in range(7):
        poll.came_late(0.5)  # one access every half second
        windows.append(poll.window)
    assert windows[0] == 100e-6  # one long gap alone does not shrink it (SHRINK_AFTER = 2)
    assert windows[1:5] == [50e-6, 25e-6, 12.5e-6, 6.25e-6]
    assert windows[5:] == [0.0, 0.0]  # below GROW_START the window closes
    assert poll.misses == 6  # a closed window is not a miss


def test_a_virtio_guest_alternating_quick_and_slow_accesses_keeps_polling() -> None:
    """ISR read soon after the interrupt (a hit), the next kick much later (a long gap): the
    window must not collapse (QEMU's poll-shrink 0 rule would drop it on every kick)."""
    poll = AdaptivePoll(200e-6, 200e-6)
    for _ in range(100):
        poll.hit()
        poll.came_late(300e-6)
    assert poll.window == 200e-6 and poll.hits == 100


def test_a_near_miss_between_long_gaps_also_resets_the_count() -> None:
    poll = AdaptivePoll(200e-6, 200e-6)
    for _ in range(10):
        poll.came_late(1.0)
        poll.came_late(150e-6)  # within the maximum: grows, and the long-gap run starts over
    assert poll.window == 200e-6


def test_a_request_just_after_the_window_grows_it_back() -> None:
    poll = AdaptivePoll(100e-6, 0.0)
    grown = []
    for _ in range(7):
        poll.came_late(60e-6)  # within the maximum: polling longer would have caught it
        grown.append(poll.window)
    assert grown[0] == GROW_START
    assert all(b == min(2 * a, 100e-6) for a, b in itertools.pairwise(grown))
    assert grown[-1] == 100e-6  # never past the maximum


def test_hits_are_counted_and_leave_the_window_alone() -> None:
    poll = AdaptivePoll(100e-6, 100e-6)
    for _ in range(3):
        poll.hit()
    assert poll.window == 100e-6
    assert poll.status() == {"max_us": 100.0, "window_us": 100.0, "hits": 3, "misses": 0}


def test_negative_maximum_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        AdaptivePoll(-1e-6)
