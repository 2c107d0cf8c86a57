"""Seccomp policy files: a pure parser for the crosvm/minijail-like text format in ``policies/<arch>/``.

Syntax (one entry per line, ``#`` starts a comment, a trailing ``\\`` continues a line)::

    @include common_device.policy          # relative to the including file
    read: 1                                 # allow unconditionally
    mmap: arg2 & PROT_EXEC == 0             # allow when the predicate holds
    clone: arg0 & CLONE_THREAD || arg0 == 0x11
    openat: return ENOENT                   # fail with an errno instead of killing
    ioctl: arg1 == FIONBIO; return ENOTTY   # allow one request, fail the others

A predicate is in disjunctive normal form (``||`` of ``&&`` of atoms). Atoms are
``argN OP VALUE`` with OP one of ``== != < <= > >=``, ``argN & MASK == VALUE`` (masked compare),
``argN & BIT`` (a single bit set), ``argN in ~MASK`` (no bit of MASK set; crosvm's W^X idiom).
Values are integers or the named constants of :data:`CONSTANTS`, optionally joined with ``|``.

Every entry must be *justified*: a trailing comment, or a comment line above it within the block of
consecutive non-blank lines it belongs to (minijail ``tools/seccomp_policy_lint.py`` discipline).
A syscall named twice (across includes too) is an error, as in minijail's compiler.

This module is pure: it never opens files itself (the caller passes a ``read`` function), never
resolves syscall names (that needs libseccomp, see ``seccomp_loader``) and never loads a filter.
"""

from __future__ import annotations

import errno as _errno
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath

from mpqemu_mgmt.errors import PolicyError

#: Named constants usable in predicates (x86_64 Linux UAPI values).
CONSTANTS: dict[str, int] = {
    # <asm-generic/mman-common.h>
    "PROT_NONE": 0x0,
    "PROT_READ": 0x1,
    "PROT_WRITE": 0x2,
    "PROT_EXEC": 0x4,
    "MAP_SHARED": 0x01,
    "MAP_PRIVATE": 0x02,
    "MAP_FIXED": 0x10,
    "MAP_ANONYMOUS": 0x20,
    "MADV_NORMAL": 0,
    "MADV_RANDOM": 1,
    "MADV_SEQUENTIAL": 2,
    "MADV_WILLNEED": 3,
    "MADV_DONTNEED": 4,
    "MADV_FREE": 8,
    "MADV_REMOVE": 9,
    "MADV_DONTFORK": 10,
    "MADV_DOFORK": 11,
    "MADV_MERGEABLE": 12,
    "MADV_HUGEPAGE": 14,
    "MADV_NOHUGEPAGE": 15,
    "MADV_DONTDUMP": 16,
    "MADV_DODUMP": 17,
    "MADV_GUARD_INSTALL": 102,
    "MADV_GUARD_REMOVE": 103,
    # <linux/sched.h>
    "CLONE_VM": 0x00000100,
    "CLONE_FS": 0x00000200,
    "CLONE_FILES": 0x00000400,
    "CLONE_SIGHAND": 0x00000800,
    "CLONE_THREAD": 0x00010000,
    "CLONE_NEWUSER": 0x10000000,
    # <linux/fcntl.h>, <asm-generic/fcntl.h>
    "AT_EMPTY_PATH": 0x1000,
    "F_DUPFD": 0,
    "F_GETFD": 1,
    "F_SETFD": 2,
    "F_GETFL": 3,
    "F_SETFL": 4,
    "F_DUPFD_CLOEXEC": 1030,
    "O_CLOEXEC": 0o2000000,
    "O_NONBLOCK": 0o4000,
    # <linux/prctl.h>
    "PR_SET_DUMPABLE": 4,
    "PR_SET_NAME": 15,
    "PR_GET_NAME": 16,
    "PR_SET_NO_NEW_PRIVS": 38,
    "PR_SET_VMA": 0x53564D41,
    # <asm-generic/signal.h>
    "SIGABRT": 6,
    "SIGKILL": 9,
    "SIGTERM": 15,
    # <linux/socket.h>
    "AF_UNIX": 1,
    "AF_INET": 2,
    "SOCK_STREAM": 1,
    "SOCK_CLOEXEC": 0o2000000,
    "SOCK_NONBLOCK": 0o4000,
    "MSG_CMSG_CLOEXEC": 0x40000000,
    # <linux/eventfd.h>
    "EFD_CLOEXEC": 0o2000000,
    "EFD_NONBLOCK": 0o4000,
    # ioctl requests a device may legitimately need
    "FIONBIO": 0x5421,
    "FIOCLEX": 0x5451,
    "TCGETS": 0x5401,
}

OPERATORS = ("==", "!=", "<=", ">=", "<", ">")
_U64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class Condition:
    """One argument comparison, already in libseccomp terms.

    ``op`` is one of ``== != < <= > >=`` or ``&=`` (masked equality: ``arg & mask == value``).
    """

    arg: int
    op: str
    value: int
    mask: int = 0


@dataclass(frozen=True, slots=True)
class Allow:
    """Allow the syscall when any conjunction of ``alternatives`` holds (empty: always).

    ``otherwise``: an errno returned when the predicate does not hold (minijail's
    ``expr; return E``) instead of the filter's default action.
    """

    alternatives: tuple[tuple[Condition, ...], ...] = ()
    otherwise: int | None = None
    #: the negated predicate, one conjunction, used for ``otherwise`` (libseccomp has no "else")
    negated: tuple[Condition, ...] = ()


@dataclass(frozen=True, slots=True)
class Errno:
    """Fail the syscall with ``errno`` (crosvm ``return ENOENT``), never kill."""

    errno: int


Action = Allow | Errno


@dataclass(frozen=True, slots=True)
class Entry:
    """One policy line after parsing."""

    syscall: str
    action: Action
    source: str
    line: int
    justification: str | None


@dataclass(frozen=True, slots=True)
class Policy:
    """A whole policy with its includes flattened, in file order."""

    name: str
    entries: tuple[Entry, ...]

    def syscalls(self) -> frozenset[str]:
        return frozenset(e.syscall for e in self.entries)

    def entry(self, syscall: str) -> Entry | None:
        for e in self.entries:
            if e.syscall == syscall:
                return e
        return None


_NAME = re.compile(r"^[a-z_][a-z0-9_]*$")
_ARG = re.compile(r"^arg([0-5])$")
_MAX_INCLUDE_DEPTH = 4


def parse_value(text: str, *, source: str = "<policy>", line: int = 0) -> int:
    """An integer, a named constant, ``~X``, or ``A|B|...`` of those."""
    text = text.strip()
    if not text:
        raise PolicyError("empty value", file=source, line=line)
    if "|" in text:
        value = 0
        for part in text.split("|"):
            value |= parse_value(part, source=source, line=line)
        return value
    if text.startswith("~"):
        return ~parse_value(text[1:], source=source, line=line) & _U64
    if text in CONSTANTS:
        return CONSTANTS[text]
    try:
        return int(text, 0) & _U64
    except ValueError:
        raise PolicyError(f"unknown constant {text!r}", file=source, line=line) from None


def _parse_atom(text: str, source: str, line: int) -> Condition:
    words = text.split()
    if len(words) < 2:
        raise PolicyError(f"bad predicate atom {text!r}", file=source, line=line)
    m = _ARG.match(words[0])
    if not m:
        raise PolicyError(f"predicate must start with argN (0-5), got {words[0]!r}", file=source, line=line)
    arg = int(m.group(1))
    op = words[1]
    rest = " ".join(words[2:])
    if op == "&":
        # "argN & MASK == VALUE" or bare "argN & BIT"
        mm = re.match(r"^(.+?)\s*==\s*(.+)$", rest)
        if mm:
            mask = parse_value(mm.group(1), source=source, line=line)
            value = parse_value(mm.group(2), source=source, line=line)
            if value & ~mask:
                raise PolicyError(f"value has bits outside the mask in {text!r}", file=source, line=line)
            return Condition(arg, "&=", value, mask)
        mask = parse_value(rest, source=source, line=line)
        if mask == 0 or mask & (mask - 1):
            # libseccomp can only test "masked == value"; "any of several bits" is not expressible
            raise PolicyError(f"bare '& MASK' needs a single bit, got {text!r}", file=source, line=line)
        return Condition(arg, "&=", mask, mask)
    if op == "in":
        # crosvm: "arg2 in ~PROT_EXEC" = every set bit lies inside the allowed set
        allowed = parse_value(rest, source=source, line=line)
        return Condition(arg, "&=", 0, ~allowed & _U64)
    if op in OPERATORS:
        return Condition(arg, op, parse_value(rest, source=source, line=line))
    raise PolicyError(f"unknown operator {op!r}", file=source, line=line)


def parse_predicate(text: str, *, source: str = "<policy>", line: int = 0) -> Action:
    """The right-hand side of ``name: ...``."""
    text = text.strip()
    if text == "1":
        return Allow()
    if text.startswith("return"):
        code = text[len("return"):].strip()
        number = getattr(_errno, code, None)
        if not isinstance(number, int):
            number = parse_value(code, source=source, line=line) if code.isdigit() else None
        if number is None or not 0 < number < 4096:
            raise PolicyError(f"unknown errno {code!r}", file=source, line=line)
        return Errno(number)
    if ";" in text:
        expr, _, ret = text.partition(";")
        otherwise = parse_predicate(ret, source=source, line=line)
        allowed = parse_predicate(expr, source=source, line=line)
        if not isinstance(otherwise, Errno) or not isinstance(allowed, Allow) or not allowed.alternatives:
            raise PolicyError("expected 'predicate; return ERRNO'", file=source, line=line)
        return Allow(allowed.alternatives, otherwise.errno, _negate(allowed.alternatives, source, line))
    alternatives: list[tuple[Condition, ...]] = []
    for disjunct in text.split("||"):
        atoms = tuple(_parse_atom(a.strip(), source, line) for a in disjunct.split("&&"))
        args = [c.arg for c in atoms]
        if len(set(args)) != len(args):
            # libseccomp refuses two comparisons of one argument in one rule (EINVAL)
            raise PolicyError(f"argument compared twice in one '&&' group: {disjunct.strip()!r}",
                              file=source, line=line)
        alternatives.append(atoms)
    return Allow(tuple(alternatives))


_NEGATE = {"==": "!=", "!=": "==", "<": ">=", ">=": "<", ">": "<=", "<=": ">"}


def _negate(alternatives: tuple[tuple[Condition, ...], ...], source: str, line: int) -> tuple[Condition, ...]:
    """not (a || b || ...) as one conjunction: only when every alternative is one atom on a
    distinct argument, because libseccomp compares each argument at most once per rule and has
    no "else" branch. Anything else is refused rather than silently widened."""
    out: list[Condition] = []
    for conj in alternatives:
        if len(conj) != 1:
            raise PolicyError("'; return' needs a predicate of single atoms joined by '||'",
                              file=source, line=line)
        c = conj[0]
        if c.op in _NEGATE:
            out.append(Condition(c.arg, _NEGATE[c.op], c.value))
        elif c.mask and not c.mask & (c.mask - 1):  # single-bit masked test: flip the bit
            out.append(Condition(c.arg, "&=", c.mask ^ c.value, c.mask))
        else:
            raise PolicyError("'; return' cannot negate a multi-bit mask test", file=source, line=line)
    if len({c.arg for c in out}) != len(out):
        raise PolicyError("'; return' needs each '||' alternative on a different argument "
                          "(libseccomp compares an argument once per rule)", file=source, line=line)
    return tuple(out)


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Join ``\\`` continuations; keep the first physical line number."""
    out: list[tuple[int, str]] = []
    pending = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        if not pending:
            start = number
        stripped = raw.rstrip()
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        out.append((start, pending + raw))
        pending = ""
    if pending:
        out.append((start, pending))
    return out


def parse_policy(
    name: str,
    read: Callable[[str], str],
    *,
    _depth: int = 0,
    _stack: tuple[str, ...] = (),
) -> Policy:
    """Parse the policy ``name`` (a path understood by ``read``), flattening its includes.

    ``read(path)`` returns a file's text; include paths are resolved relative to the includer.
    Raises PolicyError (with ``file`` and ``line``) on any syntax error, unknown constant,
    include cycle or duplicate syscall.
    """
    if name in _stack:
        raise PolicyError(f"include cycle: {' -> '.join((*_stack, name))}", file=name, line=0)
    if _depth > _MAX_INCLUDE_DEPTH:
        raise PolicyError("includes nested too deeply", file=name, line=0)
    try:
        text = read(name)
    except OSError as exc:
        raise PolicyError(f"cannot read policy: {exc.strerror or exc}", file=name, line=0) from exc
    entries: list[Entry] = []
    block_comment: str | None = None  # the nearest comment line above, within the current block
    for number, raw in _logical_lines(text):
        code, _, comment = raw.partition("#")
        code, comment = code.strip(), comment.strip()
        if not code:
            # a blank line ends a block; a comment line justifies the entries below it
            block_comment = comment or None
            continue
        if code.startswith("@include"):
            target = code[len("@include"):].strip()
            if not target:
                raise PolicyError("@include needs a file name", file=name, line=number)
            path = str(PurePosixPath(name).parent / target) if not target.startswith("/") else target
            included = parse_policy(path, read, _depth=_depth + 1, _stack=(*_stack, name))
            entries.extend(included.entries)
            continue
        if code.startswith("@"):
            raise PolicyError(f"unknown directive {code.split()[0]!r}", file=name, line=number)
        syscall, sep, rhs = code.partition(":")
        syscall = syscall.strip()
        if not sep or not _NAME.match(syscall):
            raise PolicyError(f"expected 'syscall: predicate', got {code!r}", file=name, line=number)
        action = parse_predicate(rhs, source=name, line=number)
        entries.append(Entry(syscall, action, name, number, comment or block_comment))
    seen: dict[str, Entry] = {}
    for e in entries:
        if e.syscall in seen:
            first = seen[e.syscall]
            raise PolicyError(
                f"{e.syscall} listed twice ({first.source}:{first.line} and {e.source}:{e.line})",
                file=e.source, line=e.line)
        seen[e.syscall] = e
    return Policy(name, tuple(entries))
