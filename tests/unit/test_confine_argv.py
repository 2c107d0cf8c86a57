"""Command lines of confined remotes: remote argv, bwrap argv, prlimit argv, one device per process."""

from __future__ import annotations

from pathlib import Path

import pytest

from mpqemu_mgmt.confine.credentials import rlimit_argv
from mpqemu_mgmt.confine.namespaces import Sandbox, bwrap_argv
from mpqemu_mgmt.confine.profile import (
    QEMU_SANDBOX,
    AppliedConfinement,
    ConfinementProfile,
    Rlimits,
    SeccompMode,
    parse_qemu_profile,
)
from mpqemu_mgmt.confine.remote_argv import RemoteFds, builtin_argv, check_one_device, qemu_argv
from mpqemu_mgmt.errors import OneDevicePerProcess, UsageError


def test_builtin_argv_matches_contract() -> None:
    argv = builtin_argv("/v/bin/python", "mpqemu_mgmt.remote", "virtio-blk", RemoteFds(4, 5, (6,)),
                        seccomp="enforce")
    assert argv == ["/v/bin/python", "-I", "-m", "mpqemu_mgmt.remote", "--device", "virtio-blk",
                    "--fd", "4", "--qmp-fd", "5", "--backing-fd", "6", "--seccomp", "enforce"]
    argv = builtin_argv("py", "m", "edu", RemoteFds(4, 5), seccomp="log", transport="vfio-user")
    assert argv[-4:] == ["--transport", "vfio-user", "--seccomp", "log"]
    argv = builtin_argv("py", "m", "edu", RemoteFds(4, 5), seccomp="enforce", poll_us=0)
    assert argv[-4:] == ["--poll-us", "0", "--seccomp", "enforce"]


def test_qemu_argv() -> None:
    argv = qemu_argv("qemu-system-x86_64", "vb0", "virtio-blk-pci", RemoteFds(4, 5, (6,), (7,)),
                     props=("num-queues=1",), sandbox=QEMU_SANDBOX)
    joined = " ".join(argv)
    assert "-machine x-remote" in joined
    assert "-device virtio-blk-pci,id=vb0,num-queues=1,drive=drive-vb0" in joined
    assert "-object x-remote-object,id=robj-vb0,devid=vb0,fd=4" in joined
    assert "-chardev socket,id=mon,fd=5,server=on,wait=off" in joined
    assert "-add-fd fd=6,set=1 -add-fd fd=7,set=1" in joined
    assert "file=/dev/fdset/1" in joined
    assert argv[argv.index("-sandbox") + 1] == QEMU_SANDBOX


@pytest.mark.parametrize("props", [("x=1,addr=2",), ("id=evil",), ("noequals",)])
def test_qemu_props_cannot_smuggle_options(props: tuple[str, ...]) -> None:
    with pytest.raises(UsageError):
        qemu_argv("q", "d0", "pci-testdev", RemoteFds(3, 4), props=props, sandbox="on")


def test_second_device_is_refused() -> None:
    with pytest.raises(OneDevicePerProcess) as info:
        qemu_argv("q", "d0", "pci-testdev", RemoteFds(3, 4), sandbox="on",
                  extra=("-device", "edu,id=d1"))
    assert info.value.exit_code == 3
    with pytest.raises(OneDevicePerProcess):
        check_one_device(["py", "--device", "edu", "--device", "edu", "--fd", "3"], "builtin")
    with pytest.raises(OneDevicePerProcess):
        check_one_device(["q", "-device", "edu", "-object", "x-remote-object,fd=3",
                          "-object", "x-remote-object,fd=4"], "qemu")
    with pytest.raises(OneDevicePerProcess):
        builtin_argv("py", "m", "virtio-blk", RemoteFds(3, 4, (5, 6)), seccomp="enforce")
    check_one_device(["py", "--device", "edu", "--fd", "3"], "builtin")


@pytest.mark.parametrize("bad", ["", "1abc", "a,b", "a b", "x" * 65])
def test_device_ids(bad: str) -> None:
    with pytest.raises(UsageError):
        qemu_argv("q", bad, "edu", RemoteFds(3, 4), sandbox="on")


def test_bwrap_argv() -> None:
    argv = bwrap_argv("bwrap", Sandbox(ro_binds=("/code",), symlinks=(("usr/lib", "/lib"),)),
                      ["python", "-m", "x"], info_fd=9)
    for flag in ("--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
                 "--new-session", "--clearenv"):
        assert flag in argv
    assert argv[argv.index("--cap-drop") + 1] == "ALL"
    assert argv[argv.index("--info-fd") + 1] == "9"
    assert "--share-net" not in argv and "--bind" not in argv  # nothing writable from the host
    assert argv[argv.index("--") + 1:] == ["python", "-m", "x"]
    i = argv.index("/code")
    assert argv[i - 1] == "--ro-bind" and argv[i + 1] == "/code"
    with pytest.raises(UsageError) as info:
        bwrap_argv("bwrap", Sandbox(), [], info_fd=9)
    assert info.value.exit_code == 2


def test_rlimit_argv_sets_soft_equal_hard() -> None:
    argv = rlimit_argv(Rlimits(nofile=64, core=0, fsize=10, data=20, nproc=30), "prlimit")
    assert argv == ["prlimit", "--nofile=64:64", "--core=0:0", "--fsize=10:10", "--data=20:20",
                    "--nproc=30:30", "--"]


def test_profile() -> None:
    assert ConfinementProfile().seccomp is SeccompMode.ENFORCE
    assert ConfinementProfile().with_seccomp("log").seccomp is SeccompMode.LOG
    with pytest.raises(UsageError):
        SeccompMode.parse("permissive")
    with pytest.raises(UsageError):
        ConfinementProfile(uid=0, gid=0)
    with pytest.raises(UsageError):
        ConfinementProfile(uid=1000)
    applied = AppliedConfinement("enforce", ("user", "pid"), 995)
    assert applied.to_dict() == {"seccomp": "enforce", "namespaces": ["user", "pid"], "uid": 995}


def test_qemu_profile_file_syntax() -> None:
    p = parse_qemu_profile('sandbox = "on"\n[rlimits]\nnofile = 100\n')
    assert p.qemu_sandbox == "on" and p.rlimits.nofile == 100 and p.rlimits.core == 0
    with pytest.raises(UsageError):
        parse_qemu_profile("[rlimits]\nstack = 1\n")
    with pytest.raises(UsageError):
        parse_qemu_profile("bogus = 1\n")


def test_readonly_backing() -> None:
    argv = builtin_argv("py", "m", "virtio-blk", RemoteFds(3, 4, (5,)), seccomp="enforce", readonly=True)
    assert argv[argv.index("--backing-fd"):argv.index("--seccomp")] == ["--backing-fd", "5", "--readonly"]
    argv = builtin_argv("py", "m", "edu", RemoteFds(3, 4), seccomp="enforce", readonly=True)
    assert "--readonly" not in argv  # nothing to be read-only about
    argv = qemu_argv("q", "vb0", "virtio-blk-pci", RemoteFds(3, 4, (5,), (5,)), sandbox="on", readonly=True)
    joined = " ".join(argv)
    assert joined.count("-add-fd") == 1 and "fd=5,set=1" in joined
    assert "format=raw,file.locking=off,readonly=on" in joined


def test_unreachable_ancestor_names_the_blocking_directory() -> None:
    import os
    import tempfile

    from mpqemu_mgmt.confine.credentials import unreachable_ancestor

    with tempfile.TemporaryDirectory(dir="/tmp") as top:  # /tmp itself is searchable by all
        os.chmod(top, 0o755)
        locked = Path(top) / "home"
        (locked / "repo").mkdir(parents=True)
        os.chmod(locked, 0o700)
        nobody = 65534
        assert unreachable_ancestor(str(locked / "repo"), nobody, nobody) == str(locked)
        os.chmod(locked, 0o755)
        assert unreachable_ancestor(str(locked / "repo"), nobody, nobody) is None


def test_tmpfs_tmp_comes_before_code_binds_under_tmp() -> None:
    from mpqemu_mgmt.confine import namespaces

    sandbox = namespaces.Sandbox(ro_binds=("/tmp/checkout/.venv",), symlinks=(), die_with_parent=True)
    argv = namespaces.bwrap_argv("bwrap", sandbox, ["python"], info_fd=5)
    assert argv.index("--tmpfs") < argv.index("/tmp/checkout/.venv")


def test_confined_command_layers_and_placeholders() -> None:
    from dataclasses import replace

    from mpqemu_mgmt.confine.launcher import LaunchRequest
    from mpqemu_mgmt.confine.remote_argv import (
        LaunchHost,
        confined_command,
        remote_fds_shape,
        substitute_fds,
    )

    host = LaunchHost("/p/prlimit", "/b/bwrap", ("/code",), (("usr/lib", "/lib"),))
    req = LaunchRequest("d0", "virtio-blk", Path("/s/q"), backing=(Path("/img"),), python="/py")
    profile = ConfinementProfile()
    fds = remote_fds_shape(req, profile)
    assert set(fds.named()) == {"sock", "qmp", "backing0", "seccomp-bpf", "info"}
    argv = confined_command(req, profile, host, fds, backing_size=1 << 40)
    assert argv[0] == "/p/prlimit" and f"--fsize={1 << 40}:{1 << 40}" in argv  # raised to the image
    bwrap = argv.index("/b/bwrap")
    assert argv[bwrap - 1] == "--" and argv[argv.index("--info-fd") + 1] == "{fd:info}"
    inner = argv[argv.index("--", bwrap) + 1:]
    assert inner[:4] == ["/py", "-I", "-m", "mpqemu_mgmt.remote"]
    assert inner[inner.index("--seccomp-bpf-fd") + 1] == "{fd:seccomp-bpf}"
    numbers = {"sock": 5, "qmp": 6, "backing0": 7, "seccomp-bpf": 8, "info": 9}
    filled = substitute_fds(argv, numbers)
    assert "{" not in " ".join(filled) and filled[filled.index("--fd") + 1] == "5"
    # no namespaces: prlimit execs the remote directly, and there is no info pipe
    flat = replace(profile, namespaces=False, seccomp=SeccompMode.OFF)
    shape = remote_fds_shape(req, flat)
    assert shape.info is None and shape.seccomp_bpf is None
    argv = confined_command(req, flat, host, shape)
    assert "/b/bwrap" not in argv and argv[argv.index("--") + 1] == "/py"
    with pytest.raises(UsageError):  # a namespaced command without its info fd
        confined_command(req, profile, host, replace(fds, info=None))
    stock = LaunchRequest("t0", "pci-testdev", Path("/s/q"), backend="qemu")
    assert set(remote_fds_shape(stock, profile).named()) == {"sock", "qmp", "info"}
