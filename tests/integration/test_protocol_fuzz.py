"""A slice of the hostile-input campaign (the full one: python -m mpqemu_mgmt.testing.fuzz_mpqemu).

Real socketpairs, real SCM_RIGHTS fds of several kinds; our remote-role transport must end each
case exactly where the stock QEMU 7.2 model ends it, let only ProtocolError escape, and leak no fd.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import struct
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpqemu_mgmt.testing.fuzz_mpqemu import (
    FD_KINDS,
    Case,
    Chunk,
    Report,
    _FdSource,
    campaign,
    check_case,
    generate,
    stock_model,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def source() -> Iterator[_FdSource]:
    src = _FdSource()
    yield src
    src.close()


def test_seeded_slice_of_2000_cases() -> None:
    before = set(os.listdir("/proc/self/fd"))
    report = campaign(2000, seed=7)
    assert report.failures == []
    assert report.count == 2000 and report.fd_leaks == 0
    # The slice really exercises both endings and every error class.
    assert report.ends["eof"] > 100 and report.ends["close"] > 100
    assert set(report.errors) == {"InvalidMessage", "TooManyFds", "TruncatedMessage"}
    assert len(report.processed) == 7  # every proxy->remote command was served at least once
    assert set(os.listdir("/proc/self/fd")) == before


def test_seeded_slice_against_our_serve_loop() -> None:
    # The same cases through remote.serve.Remote (real dispatcher, pci-testdev, guest memory, irq).
    if importlib.util.find_spec("mpqemu_mgmt.remote.serve") is None:
        pytest.skip("the remote serve loop (mpqemu_mgmt.remote.serve) does not exist yet")
    report = campaign(500, seed=11, target="builtin")
    assert report.failures == []
    assert report.ends["eof"] > 50 and report.ends["close"] > 50


def test_the_model_matches_stock_qemu_on_a_few_cases() -> None:
    # The oracle itself, checked against the installed stock 7.2 x-remote (one process per case).
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 (7.2) is not installed")
    report = campaign(25, seed=3, target="stock")
    assert report.failures == []
    assert report.count == 25 and report.ends["close"] > 0 and report.ends["eof"] > 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.randoms(use_true_random=False))
def test_hypothesis_driven_generator(source: _FdSource, rng: random.Random) -> None:
    report = Report()
    check_case(generate(rng), source, report)
    assert report.failures == []


chunks = st.lists(
    st.builds(Chunk, st.binary(min_size=1, max_size=80), st.integers(0, 18), st.sampled_from(FD_KINDS)),
    min_size=1,
    max_size=5,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks)
def test_hypothesis_raw_chunks(source: _FdSource, parts: list[Chunk]) -> None:
    report = Report()
    check_case(Case(tuple(parts)), source, report)
    assert report.failures == []


def test_model_and_harness_disagree_when_they_should(source: _FdSource) -> None:
    # The oracle is not a tautology: a stream it calls "close" is refused by ours too, and the
    # accepted SYNC_SYSMEM with 8 fds is flagged as our deliberate difference from stock.
    sysmem8 = Case((Chunk(struct.pack("<i4xQ", 0, 192) + bytes(192), 8, "memfd"),))
    assert stock_model(sysmem8).deviation and stock_model(sysmem8).end == "eof"
    irq3 = Case((Chunk(struct.pack("<i4xQ", 6, 0), 3, "eventfd"),))
    assert stock_model(irq3).end == "close"
    report = Report()
    check_case(irq3, source, report)
    check_case(sysmem8, source, report)
    assert report.failures == [] and dict(report.ends) == {"close": 1, "eof": 1}
