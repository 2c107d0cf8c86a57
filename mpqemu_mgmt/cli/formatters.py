"""Output formatters for the CLI: ``--format table`` (for people) and ``--format json`` (for
automation). Pure: values in, text out; must not print or read anything.

Tables escape control characters (C0, DEL, C1 and the bidi overrides), so a guest or device name
chosen by someone else cannot move the cursor, clear the screen or fake a line (cliff and virsh do
the same). JSON keeps the data exact: json.dumps already escapes control characters.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\x1b": "\\e", "\\": "\\\\"}
_BIDI = {0x202A, 0x202B, 0x202C, 0x202D, 0x202E, 0x2066, 0x2067, 0x2068, 0x2069, 0x200E, 0x200F}


def escape(text: str) -> str:
    """Make ``text`` safe to show in a terminal cell: every control character becomes visible."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _NAMED:
            out.append(_NAMED[ch])
        elif code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0:
            out.append(f"\\x{code:02x}")
        elif code in _BIDI:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return escape(",".join(str(v) for v in value)) or "-"
    if isinstance(value, Mapping):
        return escape(" ".join(f"{k}={cell(v)}" for k, v in value.items())) or "-"
    return escape(str(value))


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Aligned columns with an upper-case header; an empty table still prints its header."""
    cols = list(columns) if columns is not None else (list(rows[0]) if rows else [])
    cells = [[cell(r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines) + "\n"


def fields(obj: Mapping[str, Any], skip: Sequence[str] = ()) -> str:
    """A two-column ``key  value`` block for one object."""
    keys = [k for k in obj if k not in skip]
    width = max((len(k) for k in keys), default=0)
    return "".join(f"{escape(k).ljust(width)}  {cell(obj[k])}\n" for k in keys)


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"


LIST_COLUMNS = ("name", "state", "driver", "devices", "unhealthy", "restarts")
DEVICE_COLUMNS = ("id", "model", "backend", "pid", "health", "restarts", "seccomp", "namespaces", "uid")


def status_table(status: Mapping[str, Any]) -> str:
    """``status NAME``: the guest's fields, then one row per device with its confinement."""
    first = ("name", "state", "driver", "pid", "reason", "console")
    ordered = {k: status[k] for k in first if k in status}
    ordered.update({k: v for k, v in status.items() if k not in ordered})
    out = fields(ordered, skip=("devices",))
    rows = []
    for d in status.get("devices", []):
        conf = d.get("confinement") or {}
        rows.append({**d, "seccomp": conf.get("seccomp"), "namespaces": conf.get("namespaces"),
                     "uid": conf.get("uid")})
    return out + "\n" + table(rows, DEVICE_COLUMNS)


def render(obj: Any, fmt: str, kind: str = "") -> str:
    """One command result in the chosen format. ``kind`` picks the table layout."""
    if fmt == "json":
        return to_json(obj)
    if kind == "status" and isinstance(obj, Mapping):
        return status_table(obj)
    if kind == "list" and isinstance(obj, list):
        return table(obj, LIST_COLUMNS)
    if isinstance(obj, Mapping):
        return fields(obj)
    if isinstance(obj, list) and all(isinstance(r, Mapping) for r in obj):
        return table(obj)
    return cell(obj) + "\n"
