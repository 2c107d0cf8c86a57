"""CLI formatters: control characters never reach the terminal raw; JSON stays exact."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from mpqemu_mgmt.cli.formatters import escape, render, status_table, table


def test_escape_named_and_hex() -> None:
    assert escape("a\nb\tc\rd\x1b[2Je\\") == "a\\nb\\tc\\rd\\e[2Je\\\\"
    assert escape("\x00\x07\x7f\x9b") == "\\x00\\x07\\x7f\\x9b"
    assert escape("evil\u202etxt.exe") == "evil\\u202etxt.exe"
    assert escape("plain é ü 中") == "plain é ü 中"


@settings(deadline=None)  # a loaded shared host must not turn slowness into failure
@given(st.text())
def test_escaped_text_has_no_control_characters(text: str) -> None:
    out = escape(text)
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or 0x202A <= ord(c) <= 0x202E for c in out)


def test_table_alignment_and_escaping() -> None:
    text = table([{"name": "a\x1b[31m", "state": "running"}, {"name": "bb", "state": None}])
    lines = text.splitlines()
    assert lines[0] == "NAME     STATE"
    assert lines[1] == "a\\e[31m  running"
    assert lines[2] == "bb       -"
    assert "\x1b" not in text


def test_empty_table_keeps_header() -> None:
    assert table([], ["name", "state"]) == "NAME  STATE\n"


def test_status_table_has_device_rows_with_confinement() -> None:
    status = {"name": "demo", "state": "running", "driver": "direct", "devices": [
        {"id": "edu0", "model": "edu", "backend": "builtin", "pid": 42, "health": "healthy", "restarts": 1,
         "confinement": {"seccomp": "enforce", "namespaces": ["user", "pid"], "uid": 61000}}]}
    text = status_table(status)
    assert "state   running" in text
    row = text.splitlines()[-1].split()
    assert row == ["edu0", "edu", "builtin", "42", "healthy", "1", "enforce", "user,pid", "61000"]


def test_json_render_is_exact_and_parseable() -> None:
    obj = {"name": "x\x1by", "devices": [{"id": "a"}]}
    assert json.loads(render(obj, "json")) == obj


def test_list_columns_in_fixed_order() -> None:
    rows = [{"unhealthy": "", "name": "g", "devices": 2, "driver": "direct", "state": "running",
             "restarts": 0}]
    assert render(rows, "table", "list").splitlines()[0].split() == \
        ["NAME", "STATE", "DRIVER", "DEVICES", "UNHEALTHY", "RESTARTS"]
