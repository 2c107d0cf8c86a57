"""The on-disk cache of the test-guest kit: where it lives, and build-once-under-a-lock.

Kernels, initramfs images and the QEMU 11.1 root live under ``${MPQEMU_CACHE:-~/.cache/mpqemu-mgmt}``.
Several engineers' test runs build the same item at the same time, so every item is built in a
temporary sibling under an exclusive ``fcntl.flock`` and published with one ``rename(2)``: a reader
either sees no item or a complete one. This module must not know what the items are.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from mpqemu_mgmt.errors import GuestKitError


def cache_root() -> Path:
    """``$MPQEMU_CACHE`` or ``~/.cache/mpqemu-mgmt`` (created on demand)."""
    root = Path(os.environ.get("MPQEMU_CACHE") or Path.home() / ".cache" / "mpqemu-mgmt")
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def locked(item: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``<item>.lock`` (blocking) for the duration of the block."""
    item.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(f"{item}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the last fd drops the flock


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def prune(directory: Path, pattern: str, keep: int, min_age_s: float) -> int:
    """Delete the oldest files matching ``pattern`` beyond the ``keep`` newest, but only those not
    touched for ``min_age_s`` seconds (a concurrent boot may be about to open a recent one).
    Returns how many were deleted."""
    now = time.time()
    files = sorted(directory.glob(pattern), key=lambda p: p.stat().st_mtime, reverse=True)
    removed = 0
    for path in files[keep:]:
        with contextlib.suppress(FileNotFoundError):
            if now - path.stat().st_mtime >= min_age_s:
                path.unlink()
                removed += 1
    return removed


def build_once(item: Path, build: Callable[[Path], object]) -> Path:
    """Return ``item``, first running ``build(tmp)`` and renaming ``tmp`` to it if it is missing.

    ``build`` creates ``tmp`` (a file or a directory) itself. A failed build leaves nothing behind;
    its exception propagates (foreign ones wrapped in :class:`GuestKitError`).
    """
    if item.exists():  # fast path: items only ever appear by rename, so this one is complete
        return item
    with locked(item):
        if item.exists():
            return item
        # Under the lock nobody else is building this item: leftovers of killed builders can go.
        for stale in item.parent.glob(f".{item.name}.tmp-*"):
            _remove(stale)
        tmp = item.parent / f".{item.name}.tmp-{os.getpid()}"
        try:
            build(tmp)
            if not tmp.exists():
                raise GuestKitError("cache builder produced nothing", item=str(item))
            os.rename(tmp, item)
        except GuestKitError:
            _remove(tmp)
            raise
        except Exception as exc:
            _remove(tmp)
            raise GuestKitError(f"building cache item failed: {exc}", item=str(item)) from exc
        except BaseException:
            _remove(tmp)
            raise
    return item
