"""A copy of the remote's code where the dropped uid can reach it, for checkouts it cannot.

Why: bwrap runs after the uid drop (credentials.py), so every path it binds into the sandbox must
be searchable by the remote's uid. A checkout in a 0700 directory (``/root``, ``mktemp -d``)
is not. The launcher then runs the remote from a root-owned, read-only copy instead: a bare venv
(no pip, symlinked to the same base interpreter) whose site-packages hold ``mpqemu_mgmt`` and its
``policies/``, and pyseccomp for a remote that compiles its own filter (the launcher usually hands
it the program precompiled, ``--seccomp-bpf-fd``). The remote imports nothing else.

The copy is named by a digest of everything in it (and the interpreter), built once in a
temporary directory next to it and renamed into place, so concurrent launchers agree and a
changed checkout gets a new copy. Old copies are left for the operator (a few MiB each).

:func:`staged_python` only names the copy (``mpqemu-mgmt plan`` shows it); :func:`ensure_staged`
builds it.
"""

from __future__ import annotations

import compileall
import functools
import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
import venv
from pathlib import Path

import mpqemu_mgmt
from mpqemu_mgmt.errors import ConfinementError
from mpqemu_mgmt.resources import data_dir

#: where the copies live: root-owned, 0755 all the way down, on the root filesystem
STAGE_ROOT = Path("/var/lib/mpqemu-mgmt/remote-code")

_PACKAGE = Path(mpqemu_mgmt.__file__).resolve().parent
_PYVER = f"python{sys.version_info.major}.{sys.version_info.minor}"


def _sources() -> list[tuple[Path, str]]:
    """(source file, path inside site-packages) for the package's code and the policies."""
    out = [(p, str(Path("mpqemu_mgmt") / p.relative_to(_PACKAGE)))
           for p in sorted(_PACKAGE.rglob("*.py"))]
    policies = data_dir("policies")
    out += [(p, str(Path("mpqemu_mgmt/_data/policies") / p.relative_to(policies)))
            for p in sorted(policies.rglob("*")) if p.is_file()]
    # pyseccomp (one pure-Python module over libseccomp): a remote started without
    # --seccomp-bpf-fd compiles its own filter (lockdown.compile_in_child)
    spec = importlib.util.find_spec("pyseccomp")
    if spec is not None and spec.origin is not None and spec.submodule_search_locations is None:
        out.append((Path(spec.origin), "pyseccomp.py"))
    return out


@functools.cache
def _digest() -> str:
    h = hashlib.sha256(sys._base_executable.encode())  # type: ignore[attr-defined]
    for src, rel in _sources():
        h.update(rel.encode() + b"\0" + src.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def staged_dir() -> Path:
    """The copy for this checkout (it may not exist yet)."""
    return STAGE_ROOT / _digest()


def staged_python() -> str:
    """The interpreter of the copy: run ``-I -m mpqemu_mgmt.remote`` with it."""
    return str(staged_dir() / "bin" / "python")


def ensure_staged() -> str:
    """Build the copy unless it exists; its interpreter. ConfinementError when it cannot."""
    final = staged_dir()
    if (final / "bin" / "python").exists():
        return staged_python()
    try:
        for d in (STAGE_ROOT.parent, STAGE_ROOT):
            d.mkdir(mode=0o755, exist_ok=True)
            os.chmod(d, 0o755)  # (mkdir's mode is masked by the umask)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=STAGE_ROOT))
        try:
            venv.EnvBuilder(symlinks=True, with_pip=False).create(work)
            site = work / "lib" / _PYVER / "site-packages"
            for src, rel in _sources():
                dest = site / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dest)
            # bytecode now, as root: the remote's uid cannot write __pycache__ in the copy and
            # would otherwise compile every module on every start
            compileall.compile_dir(site, quiet=1)
            for dirpath, _dirnames, filenames in os.walk(work):
                os.chmod(dirpath, 0o755)
                for name in filenames:
                    path = os.path.join(dirpath, name)
                    if not os.path.islink(path):
                        os.chmod(path, 0o644)
            for name in os.listdir(work / "bin"):  # the activate scripts; the pythons are links
                if not os.path.islink(work / "bin" / name):
                    os.unlink(work / "bin" / name)
            try:
                os.rename(work, final)
            except OSError:
                if not (final / "bin" / "python").exists():
                    raise
                # another launcher built the same copy first: use that one
        finally:
            shutil.rmtree(work, ignore_errors=True)
    except OSError as exc:
        raise ConfinementError(f"cannot stage the remote's code in {STAGE_ROOT}: {exc}",
                               path=str(STAGE_ROOT)) from exc
    return staged_python()
