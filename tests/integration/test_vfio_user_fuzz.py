"""A slice of the vfio-user fuzz campaign (the full one: python -m mpqemu_mgmt.testing.fuzz_vfio_user)."""

from __future__ import annotations

from mpqemu_mgmt.testing.fuzz_vfio_user import run_campaign


def test_fuzz_slice_no_crash_no_fd_leak() -> None:
    report = run_campaign(messages=6000, seed=11, session_len=1500)
    assert report.messages >= 6000
    assert report.crashes == []
    assert report.fd_leak == []
    # the campaign really reached the hostile paths: rejected commands, broken frames, fds
    assert report.error_replies > 500 and report.fatal_frames >= 1 and report.fds_sent > 100


def test_fuzz_slice_against_the_confined_remote_process() -> None:
    """Same campaign, served by python -m mpqemu_mgmt.remote --transport vfio-user --seccomp enforce."""
    report = run_campaign(messages=2500, seed=12, session_len=1200, target="process")
    assert report.crashes == []  # no seccomp kill, no signal, no traceback
    assert report.fd_leak == []
    assert report.sessions >= 2 and report.error_replies > 200
