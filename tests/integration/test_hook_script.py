"""The installed hook script, run as libvirt runs it: argv, domain XML on stdin, exit code, stderr,
time. Real processes for the release reaping; never a libvirt call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpqemu_mgmt.hook import HOOK_NAME, install
from mpqemu_mgmt.procfs import proc_start_time
from mpqemu_mgmt.service.paths import StatePaths
from mpqemu_mgmt.service.records import DeviceRecord, GuestRecord, ProcRecord
from mpqemu_mgmt.service.store import StateStore

OURS = ("<domain type='qemu'><name>g1</name><metadata><mpq:guest xmlns:mpq='http://mpqemu-mgmt.org/x'>"
        "<mpq:device id='edu0'/></mpq:guest></metadata></domain>")


@pytest.fixture
def hook(tmp_path: Path) -> tuple[Path, StatePaths]:
    state = tmp_path / "state"
    script = install(tmp_path / "qemu.d", sys.executable, str(state))
    assert script.name == HOOK_NAME and os.access(script, os.X_OK)
    return script, StatePaths(state, state)


def run_hook(script: Path, *argv: str, stdin: str = OURS) -> tuple[int, str, float]:
    t0 = time.monotonic()
    p = subprocess.run([str(script), *argv], check=False, input=stdin, capture_output=True, text=True,
                       timeout=10, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"})  # as minimal as libvirt
    return p.returncode, p.stderr, time.monotonic() - t0


def test_prepare_refused_without_our_service(hook: tuple[Path, StatePaths]) -> None:
    script, _ = hook
    code, err, _ = run_hook(script, "g1", "prepare", "begin", "-")
    assert code == 1 and "mpqemu-mgmt start g1" in err


def test_prepare_allowed_while_our_service_starts_it(hook: tuple[Path, StatePaths]) -> None:
    script, paths = hook
    paths.starting.mkdir(parents=True)
    (paths.starting / "g1").write_text(f"{os.getpid()}\n")
    assert run_hook(script, "g1", "prepare", "begin", "-")[0] == 0
    (paths.starting / "g1").write_text("999999999\n")  # a dead service's token does not count
    assert run_hook(script, "g1", "prepare", "begin", "-")[0] == 1


def test_foreign_guest_untouched_and_reconnect_never_fails(hook: tuple[Path, StatePaths]) -> None:
    script, _ = hook
    assert run_hook(script, "other", "prepare", "begin", "-", stdin="<domain><name>o</name></domain>")[0] == 0
    assert run_hook(script, "g1", "reconnect", "begin", "-")[0] == 0
    assert run_hook(script, "g1", "reconnect", "begin", "-", stdin="garbage<")[0] == 0


def test_migrate_refused_with_reason(hook: tuple[Path, StatePaths]) -> None:
    script, _ = hook
    code, err, _ = run_hook(script, "g1", "migrate", "begin", "-")
    assert code == 1 and "does not support migration" in err


def test_release_reaps_recorded_remotes_only(hook: tuple[Path, StatePaths]) -> None:
    script, paths = hook
    ours = subprocess.Popen(["sleep", "60"])
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        st = proc_start_time(ours.pid)
        assert st is not None
        StateStore(paths).save(GuestRecord("g1", {}, state="running", devices=(
            DeviceRecord("edu0", "edu", proc=ProcRecord(ours.pid, st)),
            # a recorded pid whose start time no longer matches: recycled, must be spared
            DeviceRecord("lsi0", "lsi53c895a", proc=ProcRecord(bystander.pid, 1)),
        )))
        assert run_hook(script, "g1", "release", "end", "-")[0] == 0
        assert ours.wait(5) == -9
        assert bystander.poll() is None
        assert run_hook(script, "g1", "release", "end", "-")[0] == 0  # idempotent
    finally:
        for p in (ours, bystander):
            p.kill()
            p.wait()


def test_release_without_state_succeeds(hook: tuple[Path, StatePaths]) -> None:
    script, _ = hook
    assert run_hook(script, "nostate", "release", "end", "-")[0] == 0


def test_hook_answers_within_100ms(hook: tuple[Path, StatePaths]) -> None:
    script, _ = hook
    ops = ("prepare", "migrate", "reconnect") * 3
    times = sorted(run_hook(script, "g1", op, "begin", "-")[2] for op in ops)
    median = times[len(times) // 2]
    bare = sorted(_bare_python() for _ in range(5))[2]
    print(f"\nhook answer time: median {median * 1000:.0f} ms (bare interpreter start {bare * 1000:.0f} ms)")
    # 100 ms on an idle host (measured ~36 ms); on a loaded shared host the interpreter start alone
    # can take longer, so the hook's own share is what must stay under 100 ms.
    assert median < 0.100 or median - bare < 0.100


def _bare_python() -> float:
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-s", "-c", "pass"], check=True, timeout=10)
    return time.monotonic() - t0


def test_installed_script_is_plain_and_names_state_dir(hook: tuple[Path, StatePaths]) -> None:
    script, paths = hook
    text = script.read_text()
    assert text.startswith("#!/bin/sh\n") and str(paths.state) in text and "virsh" not in text
    json.dumps(text)  # printable
