"""Locate the data folders (xml/, qmp/, policies/) in a checkout or in an installed wheel.

In a checkout (and an editable install) they sit at the repository top level; the wheel carries
them under ``mpqemu_mgmt/_data`` (see pyproject.toml). Must not do anything but path lookups.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """Return the folder ``name`` (``"xml"``, ``"qmp"`` or ``"policies"``)."""
    for candidate in (_PACKAGE / "_data" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"data folder {name!r} not found next to {_PACKAGE}")


def repo_root() -> Path | None:
    """The checkout's top level when running from one, else None."""
    root = _PACKAGE.parent
    return root if (root / "pyproject.toml").is_file() else None
