"""The policy parser: syntax, predicates, includes, justification, duplicates (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpqemu_mgmt.confine.policy import (
    CONSTANTS,
    Allow,
    Condition,
    Errno,
    parse_policy,
    parse_predicate,
    parse_value,
)
from mpqemu_mgmt.errors import PolicyError


def files(**texts: str):  # type: ignore[no-untyped-def]
    def read(path: str) -> str:
        name = path.rsplit("/", 1)[-1]
        if name not in texts:
            raise FileNotFoundError(2, "No such file", path)
        return texts[name]
    return read


@pytest.mark.parametrize(("text", "value"), [
    ("0x4", 4), ("17", 17), ("PROT_EXEC", 4), ("PROT_READ|PROT_WRITE", 3),
    ("~PROT_EXEC", (1 << 64) - 1 - 4), ("CLONE_THREAD", 0x10000),
])
def test_values(text: str, value: int) -> None:
    assert parse_value(text) == value


@pytest.mark.parametrize(("text", "action"), [
    ("1", Allow()),
    ("return ENOENT", Errno(2)),
    ("arg2 & 0x4 == 0", Allow(((Condition(2, "&=", 0, 4),),))),
    ("arg2 in ~PROT_EXEC", Allow(((Condition(2, "&=", 0, 4),),))),
    ("arg0 & CLONE_THREAD", Allow(((Condition(0, "&=", 0x10000, 0x10000),),))),
    ("arg2 == SIGABRT", Allow(((Condition(2, "==", 6),),))),
    ("arg0 == 1 && arg1 != 2 || arg0 >= 7",
     Allow(((Condition(0, "==", 1), Condition(1, "!=", 2)), (Condition(0, ">=", 7),)))),
    ("arg1 == FIONBIO; return ENOTTY",
     Allow(((Condition(1, "==", 0x5421),),), 25, (Condition(1, "!=", 0x5421),))),
    ("arg0 & CLONE_THREAD; return EPERM",
     Allow(((Condition(0, "&=", 0x10000, 0x10000),),), 1, (Condition(0, "&=", 0, 0x10000),))),
])
def test_predicates(text: str, action: object) -> None:
    assert parse_predicate(text) == action


@pytest.mark.parametrize("text", [
    "", "2", "arg6 == 1", "argx == 1", "arg0 ~ 1", "arg0 == NOPE", "return ENOPE",
    "arg0 & 0x6",  # several bits: libseccomp cannot test "any of"
    "arg0 & 0x4 == 0x8",  # value outside the mask
    "arg0 == 1 && arg0 == 2",  # one argument twice in one rule
    "arg0 == 1 && arg1 == 2; return EPERM",  # cannot be negated as one rule
    "arg0 == 1 || arg0 == 2; return EPERM",
    "1; return EPERM",
])
def test_bad_predicates(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_predicate(text)


def test_include_justification_and_order() -> None:
    read = files(**{
        "common.policy": "# block comment\nread: 1\nwrite: 1  # trailing\n\nclose: 1\n",
        "dev.policy": "# the device\n@include common.policy\n\n# why mmap\nmmap: arg2 in ~PROT_EXEC\n",
    })
    policy = parse_policy("/p/x86_64/dev.policy", read)
    assert [e.syscall for e in policy.entries] == ["read", "write", "close", "mmap"]
    by = {e.syscall: e for e in policy.entries}
    assert by["read"].justification == "block comment"
    assert by["write"].justification == "trailing"
    assert by["close"].justification is None  # a blank line ended the block
    assert by["mmap"].justification == "why mmap"
    assert by["read"].source == "/p/x86_64/common.policy" and by["read"].line == 2


def test_continuation_lines() -> None:
    read = files(**{"a.policy": "# why\nmadvise: arg2 == 4 || \\\n   arg2 == 8\nread: 1 # r\n"})
    policy = parse_policy("a.policy", read)
    madvise = policy.entry("madvise")
    assert madvise is not None and isinstance(madvise.action, Allow)
    assert len(madvise.action.alternatives) == 2
    read_entry = policy.entry("read")
    assert read_entry is not None and read_entry.line == 4


@pytest.mark.parametrize(("texts", "message"), [
    ({"a.policy": "read: 1 # x\nread: 1 # y\n"}, "listed twice"),
    ({"a.policy": "@include b.policy\nread: 1 # x\n", "b.policy": "read: 1 # y\n"}, "listed twice"),
    ({"a.policy": "@include b.policy\n", "b.policy": "@include a.policy\n"}, "cycle"),
    ({"a.policy": "@include missing.policy\n"}, "cannot read"),
    ({"a.policy": "@frequency x\n"}, "unknown directive"),
    ({"a.policy": "Read: 1\n"}, "expected"),
    ({"a.policy": "read 1\n"}, "expected"),
])
def test_policy_errors_name_file_and_line(texts: dict[str, str], message: str) -> None:
    with pytest.raises(PolicyError, match=message) as info:
        parse_policy("a.policy", files(**texts))
    assert "file" in info.value.details and "line" in info.value.details


@given(st.lists(st.sampled_from(sorted(CONSTANTS)), min_size=1, max_size=4))
def test_or_of_constants(names: list[str]) -> None:
    expected = 0
    for n in names:
        expected |= CONSTANTS[n]
    assert parse_value("|".join(names)) == expected


@given(st.integers(min_value=0, max_value=5), st.sampled_from(["==", "!=", "<", "<=", ">", ">="]),
       st.integers(min_value=0, max_value=(1 << 64) - 1))
def test_atom_roundtrip(arg: int, op: str, value: int) -> None:
    assert parse_predicate(f"arg{arg} {op} {value:#x}") == Allow(((Condition(arg, op, value),),))


_TOKENS = st.sampled_from(["read", "mmap", ":", "1", "arg0", "arg2", "arg9", "&", "==", "!=", "<", "in",
                           "~", "|", "||", "&&", ";", "return", "EPERM", "ENOENT", "PROT_EXEC", "0x4",
                           "@include", "x.policy", "#", "why", "\\", "\n", " ", "-1", "99999999999999999999"])


@given(st.lists(_TOKENS, max_size=40))
def test_hostile_policy_text_only_raises_policy_error(tokens: list[str]) -> None:
    text = " ".join(tokens)
    try:
        policy = parse_policy("x.policy", files(**{"x.policy": text}))
    except PolicyError as exc:
        assert exc.details.get("file") is not None
        return
    for entry in policy.entries:  # whatever parsed is well-formed
        assert entry.syscall and (isinstance(entry.action, Allow | Errno))
