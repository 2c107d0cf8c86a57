"""Guest shell scripts (busybox sh) shipped as package data, and a loader for them.

Each ``*.sh`` here runs inside the test guest as ``/guest/<name>``; its exit status comes back as
:attr:`mpqemu_mgmt.guestkit.boot.BootResult.status`. This module only reads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources

from mpqemu_mgmt.errors import GuestKitError
from mpqemu_mgmt.guestkit.initramfs import GuestScript


def script_text(name: str) -> str:
    """The text of the shipped script ``name`` (e.g. ``"edu_check.sh"``)."""
    try:
        return resources.files(__name__).joinpath(name).read_text()
    except (FileNotFoundError, OSError) as exc:
        raise GuestKitError("no such guest script", script=name) from exc


def guest_script(name: str, env: Mapping[str, str] | None = None) -> GuestScript:
    """The shipped script ``name`` as a :class:`GuestScript` with ``env`` exported."""
    return GuestScript(script_text(name), name=name, env=dict(env or {}))
