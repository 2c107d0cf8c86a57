"""The remote's last step before serving: no new privileges, not dumpable, then the seccomp allowlist.

Called by a remote's ``__main__`` after every import, fd wrap and warm-up, because a tight
allowlist kills CPython's own start-up (confinement.md §5.2, §8.1 steps 6-9). Policies are
``policies/<arch>/<model>.policy`` (each includes ``common_device.policy``).

Must not be called before imports are done, and must not start threads or open anything after
the filter is loaded (the filter forbids it).
"""

from __future__ import annotations

import ctypes
import platform
import re
import sys
from pathlib import Path

from mpqemu_mgmt.confine import seccomp_loader
from mpqemu_mgmt.confine.policy import Policy, parse_policy
from mpqemu_mgmt.confine.profile import SeccompMode
from mpqemu_mgmt.errors import ConfinementError, MpqemuError
from mpqemu_mgmt.resources import data_dir

# <linux/prctl.h>
PR_SET_DUMPABLE = 4
PR_SET_NO_NEW_PRIVS = 38

_MODEL = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_ARCH = {"x86_64": "x86_64", "amd64": "x86_64"}


def policy_path(model: str, policies: Path | None = None) -> Path:
    """``policies/<arch>/<model>.policy``; ConfinementError for an unknown model or architecture."""
    if not _MODEL.match(model):
        raise ConfinementError(f"invalid device model name {model!r}")
    arch = _ARCH.get(platform.machine())
    if arch is None:
        raise ConfinementError(f"no seccomp policies for architecture {platform.machine()!r}")
    root = policies if policies is not None else data_dir("policies")
    path = root / arch / f"{model}.policy"
    if not path.is_file():
        raise ConfinementError(f"no seccomp policy for device model {model!r}", path=str(path))
    return path


def load_policy(model: str, policies: Path | None = None) -> Policy:
    """Read and parse the model's policy with its includes (IO: reads the policy files)."""
    path = policy_path(model, policies)
    return parse_policy(str(path), lambda p: Path(p).read_text(encoding="utf-8"))


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise ConfinementError(f"prctl({option}, {value}) failed", errno=err)


def lock_down(model: str, mode: str) -> None:
    """PR_SET_NO_NEW_PRIVS, PR_SET_DUMPABLE 0, then the model's seccomp filter in ``mode``.

    Raises ConfinementError (or PolicyError for a broken policy file) before anything
    irreversible when the policy cannot be read or compiled.
    """
    seccomp_mode = SeccompMode.parse(mode)
    flt = None
    if seccomp_mode is not SeccompMode.OFF:
        try:
            flt = seccomp_loader.build_filter(load_policy(model), seccomp_mode)
        except MpqemuError:
            raise
        except OSError as exc:
            raise ConfinementError(f"cannot read the seccomp policy for {model!r}: {exc}") from exc
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    # not dumpable: no core file of guest RAM and no ptrace by another process of the same uid
    _prctl(PR_SET_DUMPABLE, 0)
    if flt is None:
        sys.stderr.write(
            "mpqemu-mgmt: WARNING: seccomp is OFF for this remote device process; "
            "a compromised device can make any system call (development only)\n")
        sys.stderr.flush()
        return
    try:
        flt.load()
    except OSError as exc:
        raise ConfinementError(f"seccomp filter could not be loaded: {exc}") from exc
