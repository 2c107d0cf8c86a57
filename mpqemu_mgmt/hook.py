"""The libvirt hook: ``/etc/libvirt/hooks/qemu.d/50-mpqemu-mgmt <guest> <op> <sub-op> <extra>``.

libvirt runs it with the full domain XML on stdin (docs/hooks.rst) and waits for it, so it must be
fast (answers within 100 ms: stdlib only, no lxml) and must never call back into libvirt ("A hook
script must not call back into libvirt ... A deadlock is likely to occur", docs/hooks.rst). It
guards and cleans up; it never plugs devices (that needs ``getfd`` through libvirt):

* ``prepare begin``: refuse a plain ``virsh start`` of a guest carrying our ``<metadata>`` unless
  our service is starting it (a start token ``<run>/starting/<name>`` naming a live service pid);
  without our remotes the guest would boot without its devices. The token is looked for in the
  hook's own state directory and in the one the guest's ``<mpq:state-dir>`` names, so a service
  run with another ``--state-dir`` is recognised too (whoever can define a domain is root anyway).
* ``release end``: reap the guest's remotes (pid and start time from the state file), idempotent.
* ``migrate begin`` / ``restore begin``: refuse with the reason: x-pci-proxy-dev registers a
  migration blocker (hw/remote/proxy.c), and the remote's state would not follow.
* ``reconnect begin``: never fails: a failure would make libvirtd kill the running QEMU.

Exit 0 on success; on refusal exit 1 with one line on stderr, which libvirt logs. :func:`decide`
is pure (inputs in, verdict out); :func:`main` is the IO shell.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mpqemu_mgmt.procfs import pid_alive
from mpqemu_mgmt.service.paths import StatePaths

# Only what every call needs is imported up front: json, the records and ElementTree cost tens of
# milliseconds on a loaded host and are loaded only by the calls that parse something.

HOOK_NAME = "50-mpqemu-mgmt"
DEFAULT_HOOKS_DIR = Path("/etc/libvirt/hooks/qemu.d")
TOKEN_MAX_AGE = 600.0  # a start token older than this is stale (a crashed start)


class Verdict:
    __slots__ = ("code", "message", "reap")

    def __init__(self, code: int, message: str = "", reap: bool = False) -> None:
        self.code = code  # 0 allow, 1 refuse
        self.message = message
        self.reap = reap  # kill the guest's remotes

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Verdict) and (self.code, self.message, self.reap) == (
            other.code, other.message, other.reap)

    def __hash__(self) -> int:
        return hash((self.code, self.message, self.reap))

    def __repr__(self) -> str:
        return f"Verdict({self.code}, {self.message!r}, reap={self.reap})"


def our_devices(domain_xml: str) -> list[str] | None:
    """The device ids in our ``<metadata>`` block, or None when the guest is not ours.

    Any child of ``<metadata>`` in a namespace containing "mpqemu" counts as ours (the designer
    owns the exact namespace); its descendants named ``device`` with an ``id`` are the devices.
    """
    if "mpqemu" not in domain_xml:
        return None  # fast path: not ours, nothing to parse
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(domain_xml)
    except ET.ParseError:
        return None
    meta = root.find("metadata")
    if meta is None:
        return None
    for child in meta:
        if child.tag.startswith("{") and "mpqemu" in child.tag[1:child.tag.index("}")]:
            return [el.get("id", "") for el in child.iter() if el.tag.rpartition("}")[2] == "device"]
    return None


def our_state_dir(domain_xml: str) -> str | None:
    """The guest's state directory as the designer recorded it (``<mpq:state-dir>``), if any."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(domain_xml)
    except ET.ParseError:
        return None
    for el in root.iter():
        if isinstance(el.tag, str) and el.tag.endswith("}state-dir") and "mpqemu" in el.tag and el.text:
            return el.text.strip()
    return None


def decide(op: str, sub_op: str, guest: str, devices: list[str] | None, token_valid: bool) -> Verdict:
    """The hook's table. Pure."""
    if devices is None:
        return Verdict(0)  # not ours: stay out of the way
    if op == "prepare" and sub_op == "begin" and not token_valid:
        listed = ", ".join(devices) or "none yet"
        return Verdict(1, f"mpqemu-mgmt: guest {guest!r} has remote devices ({listed})"
                          f"; start it with `mpqemu-mgmt start {guest}` so they are plugged before it runs")
    if op in ("migrate", "restore") and sub_op == "begin":
        return Verdict(1, f"mpqemu-mgmt: {op} of guest {guest!r} refused: x-pci-proxy-dev does not support "
                          "migration (QEMU registers a migration blocker) and its remote processes "
                          "cannot follow")
    if op == "release":
        return Verdict(0, reap=True)
    return Verdict(0)  # reconnect, started, stopped, start ...: never fail


def owner_paths(domain_xml: str, guest: str) -> StatePaths | None:
    """The paths of the service that designed the guest, from ``<mpq:state-dir>``.

    A service run with ``--state-dir D`` keeps the guest in ``D/guests/<name>`` and its start
    tokens in ``D/starting`` (run == state, service/paths.py); any other layout gives None.
    """
    recorded = our_state_dir(domain_xml)
    if not recorded:
        return None
    guest_dir = Path(recorded)
    if guest_dir.name != guest or guest_dir.parent.name != "guests":
        return None
    root = guest_dir.parent.parent
    return StatePaths(root, root)


def token_valid(paths: StatePaths, guest: str, now: float | None = None) -> bool:
    """Is our service starting ``guest`` right now? The token names the service's pid."""
    token = paths.starting / guest
    try:
        pid = int(token.read_text().split()[0])
        age = (time.time() if now is None else now) - token.stat().st_mtime
    except (OSError, ValueError, IndexError):
        return False
    if age > TOKEN_MAX_AGE:
        return False
    return pid_alive(pid)  # (a service of another uid counts as alive)


def reap(paths: StatePaths, guest: str, record_path: Path | None = None) -> list[int]:
    """SIGKILL the remotes recorded for ``guest`` whose pid still names the same process."""
    import json

    from mpqemu_mgmt.procfs import proc_start_time
    from mpqemu_mgmt.service.records import GuestRecord

    try:
        path = record_path if record_path is not None and record_path.is_file() else paths.record(guest)
        record = GuestRecord.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError):
        return []
    killed = []
    for dev in record.devices:
        proc = dev.proc
        if proc is None:
            continue
        st = proc_start_time(proc.pid)
        if st is None or (proc.start_time and st != proc.start_time):
            continue  # gone, or the pid was recycled by someone else
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
            killed.append(proc.pid)
    return killed


def run(argv: Sequence[str], stdin_text: str, paths: StatePaths) -> int:
    """The hook entry proper: argv is ``guest op sub-op extra`` as libvirt passes it."""
    guest, op, sub_op = [*argv, "-", "-", "-"][:3]
    devices = our_devices(stdin_text)
    valid = False
    if devices is not None and op == "prepare":
        owner = owner_paths(stdin_text, guest)
        valid = token_valid(paths, guest) or (owner is not None and token_valid(owner, guest))
    verdict = decide(op, sub_op, guest, devices, valid)
    if verdict.reap:
        state_dir = our_state_dir(stdin_text)
        with contextlib.suppress(Exception):  # release is clean-up: it never fails
            reap(paths, guest, Path(state_dir) / "guest.json" if state_dir else None)
    if verdict.message:
        print(verdict.message, file=sys.stderr)
    return verdict.code


def script_text(python: str, state_dir: str | None) -> str:
    state = f" --state-dir '{state_dir}'" if state_dir else ""
    return ("#!/bin/sh\n"
            "# Installed by `mpqemu-mgmt hook install`: guards guests that carry mpqemu-mgmt metadata.\n"
            "# It never calls libvirt (docs/hooks.rst). libvirtd reads qemu.d/ only when it starts.\n"
            f"exec '{python}' -s -m mpqemu_mgmt.hook{state} \"$@\"\n")


def install(hooks_dir: Path, python: str, state_dir: str | None) -> Path:
    hooks_dir.mkdir(parents=True, exist_ok=True)
    path = hooks_dir / HOOK_NAME
    tmp = path.with_name(f".{HOOK_NAME}.tmp")
    tmp.write_text(script_text(python, state_dir))
    tmp.chmod(0o755)
    tmp.replace(path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    state_dir = None
    if len(args) >= 2 and args[0] == "--state-dir":
        state_dir, args = args[1], args[2:]
    try:
        stdin_text = sys.stdin.read() if not sys.stdin.isatty() else ""
    except (OSError, ValueError):
        stdin_text = ""
    return run(args, stdin_text, StatePaths.resolve(state_dir))


if __name__ == "__main__":
    sys.exit(main())
