"""Exit status classification and audit-record parsing (pure)."""

from __future__ import annotations

import pytest

from mpqemu_mgmt.confine.violations import (
    SECCOMP_RET_KILL_PROCESS,
    SECCOMP_RET_LOG,
    classify_exit,
    parse_audit,
)

LINE = ('6,1234,5678,-;audit: type=1326 audit(1700000000.123:45): auid=4294967295 uid=995 gid=995 '
        'ses=4294967295 subj=unconfined pid=4242 comm="python" exe="/usr/bin/python3.11" sig=31 '
        'arch=c000003e syscall=41 compat=0 ip=0x7f00 code=0x80000000')


def test_parse_kill_record() -> None:
    rec = parse_audit(LINE)
    assert rec is not None
    assert (rec.pid, rec.syscall, rec.comm) == (4242, 41, "python")
    assert rec.action == SECCOMP_RET_KILL_PROCESS


def test_parse_log_record_and_noise() -> None:
    rec = parse_audit(LINE.replace("code=0x80000000", "code=0x7ffc0000").replace("sig=31", "sig=0"))
    assert rec is not None and rec.action == SECCOMP_RET_LOG
    assert parse_audit("6,1,2,-;audit: type=1400 apparmor=DENIED pid=1 syscall=2") is None
    assert parse_audit("random kernel line") is None


@pytest.mark.parametrize(("rc", "sig", "seccomp"), [
    (0, None, False), (1, None, False), (159, 31, True), (-31, 31, True),
    (134, 6, False), (-6, 6, False), (137, 9, False), (143, 15, False),
])
def test_classify(rc: int, sig: int | None, seccomp: bool) -> None:
    report = classify_exit(rc)
    assert (report.signal, report.seccomp) == (sig, seccomp)
