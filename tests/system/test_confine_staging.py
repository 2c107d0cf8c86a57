"""A checkout the remote's uid cannot reach (a 0700 directory, e.g. /root or ``mktemp -d``) still
launches confined remotes: the launcher runs them from a root-owned copy (confine/staging.py).

Real processes as root: a copy of the package in a 0700 directory launches pci-testdev through
the real launcher (uid drop, bwrap, seccomp enforce) and answers a config read.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mpqemu_mgmt.confine import staging
from mpqemu_mgmt.resources import data_dir, repo_root

_SKIP = ("confined launches need root" if os.geteuid() != 0
         else "bubblewrap is not installed" if shutil.which("bwrap") is None
         else "needs a checkout (policies/ beside the package)" if repo_root() is None else None)
pytestmark = [pytest.mark.skipif(_SKIP is not None, reason=_SKIP or ""), pytest.mark.timeout(120)]

LAUNCH = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import mpqemu_mgmt
    from mpqemu_mgmt.confine.launcher import LaunchRequest, launch, profile_for
    from mpqemu_mgmt.testing.proxysim import ProxySim
    tmp = Path(sys.argv[1])
    remote = launch(LaunchRequest("t0", "pci-testdev", tmp / "t0.qmp"), profile_for("builtin"))
    try:
        with ProxySim(remote.proxy) as px:
            value = px.config_read(0, 4)
        exe = os.readlink(f"/proc/{remote.pid}/exe")
        argv0 = Path(f"/proc/{remote.pid}/cmdline").read_bytes().split(b"\\0")[0].decode()
        print(mpqemu_mgmt.__file__, hex(value), argv0, exe, remote.confinement.uid)
    finally:
        remote.stop(1.0)
""")


def test_a_checkout_in_a_0700_directory_runs_from_the_staged_copy(tmp_path: Path) -> None:
    hidden = tmp_path / "private"
    hidden.mkdir(mode=0o700)
    checkout = hidden / "mpqemu-mgmt"
    checkout.mkdir()
    shutil.copytree(Path(staging.__file__).resolve().parents[1], checkout / "mpqemu_mgmt",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(data_dir("policies"), checkout / "policies")
    code = f"import sys; sys.path.insert(0, {str(checkout)!r})\n" + LAUNCH
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                         timeout=90, check=False)
    assert out.returncode == 0, out.stderr
    package, value, argv0, exe, uid = out.stdout.split()
    assert package.startswith(str(checkout))  # the launcher ran from the unreachable checkout
    assert value == "0x51b36"  # and its remote answered: Red Hat pci-testdev, 1b36:0005
    assert argv0.startswith(str(staging.STAGE_ROOT))  # from the copy
    assert Path(exe).is_relative_to("/usr")  # the same base interpreter
    copy = Path(argv0).parents[1]
    site = copy / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    assert (site / "mpqemu_mgmt" / "remote" / "__main__.py").read_bytes() == (
        checkout / "mpqemu_mgmt" / "remote" / "__main__.py").read_bytes()
    for path in (copy, site / "mpqemu_mgmt", site / "mpqemu_mgmt" / "remote" / "__main__.py"):
        st = path.stat()
        assert st.st_uid == 0 and not st.st_mode & 0o022, path  # root's, not writable by the remote
    assert int(uid) != 0


def test_only_an_unreachable_checkout_is_staged(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from mpqemu_mgmt.confine import launcher

    req = launcher.LaunchRequest("t0", "pci-testdev", Path("/tmp/x.qmp"))
    monkeypatch.setattr(launcher, "_code_dirs", lambda _r: ["/usr/lib/python3", ""])
    assert launcher._with_reachable_code(req, (-1, -1)) is req  # searchable by "others"
    hidden = tmp_path / "private"
    hidden.mkdir(mode=0o700)
    monkeypatch.setattr(launcher, "_code_dirs", lambda _r: ["/usr/lib/python3", str(hidden / "code")])
    staged = launcher._with_reachable_code(req, (-1, -1))
    assert staged.python == staging.staged_python() and staged.model == req.model
    assert launcher._with_reachable_code(req, None) is req  # no uid drop: nothing to reach
