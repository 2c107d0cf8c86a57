"""A device's ``poll_us`` reaches its confined remote: spec key → LaunchRequest → ``--poll-us``.

Real processes as root: the launcher starts our pci-testdev in its sandbox (uid drop, bwrap,
seccomp enforce); ProxySim drives it, its own QMP monitor reports the polling window it runs with.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from mpqemu_mgmt.confine.launcher import LaunchRequest, launch, profile_for
from mpqemu_mgmt.domain.spec import device_from_pairs
from mpqemu_mgmt.orchestrate.confined import launch_request
from mpqemu_mgmt.testing.builtin_remote import device_status
from mpqemu_mgmt.testing.proxysim import ProxySim

_SKIP = ("confined launches need root" if os.geteuid() != 0
         else "bubblewrap is not installed" if shutil.which("bwrap") is None else None)
pytestmark = [pytest.mark.skipif(_SKIP is not None, reason=_SKIP or ""), pytest.mark.timeout(60)]


@pytest.mark.parametrize(("pairs", "max_us"), [
    (["poll_us=0"], 0.0),  # turned off by the operator
    ([], 200.0),  # the remote's default
])
def test_spec_poll_us_reaches_the_confined_remote(tmp_path: Path, pairs: list[str], max_us: float) -> None:
    dev = device_from_pairs(["id=t1", "model=pci-testdev", *pairs])
    req: LaunchRequest = launch_request(dev, qmp_path=str(tmp_path / "t1.qmp"),
                                        log_path=str(tmp_path / "t1.log"), qemu_binary="qemu-system-x86_64")
    remote = launch(req, profile_for(dev.backend))
    try:
        assert remote.proxy is not None
        with ProxySim(remote.proxy) as px:
            for _ in range(100):
                assert px.config_read(0, 4) == 0x00051B36
            poll = device_status(req.qmp_path)["loop"]["poll"]
        assert poll["max_us"] == max_us, poll
        if max_us:
            assert poll["hits"] > 20, poll  # most, on a quiet host
        else:
            assert poll["hits"] == 0
    finally:
        remote.stop(1.0)
