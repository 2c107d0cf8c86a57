"""Command lines, pure: the direct driver's main QEMU, and the remote device processes.

The main QEMU starts paused (``-S``) with its RAM in a shared memfd (the remote maps guest RAM
from the fds of ``SYNC_SYSMEM``; docs/system/multi-process.rst asks for a shareable backend), QMP
on a UNIX socket in the state directory, its serial console written to a log file there, and QEMU's
own seccomp filter (``-sandbox on,...`` with the options libvirt uses). :func:`remote_argv` is the
unconfined remote (orchestrate.processes.ProcessLauncher runs it); it carries ``{fd:sock}`` (the
inherited socket end), ``{fd:backing0}`` and ``{python}`` placeholders the launcher fills in, so
``mpqemu-mgmt plan`` prints what runs. (The confined launcher renders its own command,
confine.remote_argv.confined_command, with the same ``{fd:NAME}`` names.) Must not spawn anything
or touch the filesystem.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from mpqemu_mgmt.domain import topology
from mpqemu_mgmt.domain.spec import DeviceSpec, GuestSpec

#: What libvirt passes for its own QEMUs on Debian 12 (seen in the domain log), minus nothing.
SANDBOX: Final = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
#: the same ``{fd:NAME}`` names as confine.remote_argv.RemoteFds.placeholders
FD_PLACEHOLDER: Final = "{fd:sock}"
BACKING_FD_PLACEHOLDER: Final = "{fd:backing0}"
PYTHON_PLACEHOLDER: Final = "{python}"
MEM_ID: Final = "mem0"


@dataclass(frozen=True)
class GuestPaths:
    """Every path the guest's processes use, under one state directory."""

    state_dir: str

    @property
    def qmp(self) -> str:
        return f"{self.state_dir}/qmp.sock"

    @property
    def console(self) -> str:
        return f"{self.state_dir}/console.log"

    def remote_qmp(self, device_id: str) -> str:
        return f"{self.state_dir}/remote-{device_id}.qmp"

    def remote_log(self, device_id: str) -> str:
        return f"{self.state_dir}/remote-{device_id}.log"

    @property
    def vfio_user_dir(self) -> str:
        """The private (0700, the main QEMU's uid) directory of the vfio-user listening sockets."""
        return f"{self.state_dir}/vfu"

    def vfio_user_socket(self, device_id: str) -> str:
        """Where QEMU's vfio-user-pci connects; unlinked as soon as it has (one client only)."""
        return f"{self.vfio_user_dir}/{device_id}.sock"


def main_argv(spec: GuestSpec, paths: GuestPaths) -> tuple[str, ...]:
    """The direct driver's main QEMU, paused, with no proxy devices yet (they are hot-added)."""
    mem = f"{spec.memory_mib}M"
    argv: list[str] = [
        spec.qemu_binary,
        "-name", f"guest={spec.name},debug-threads=on",
        "-machine", f"{spec.machine},accel={spec.accel},memory-backend={MEM_ID}",
        "-m", mem,
        "-smp", str(spec.vcpus),
        # share=on: the remote mmaps these pages (SYNC_SYSMEM in hw/remote/mpqemu-link.c).
        "-object", f"memory-backend-memfd,id={MEM_ID},size={mem},share=on",
        "-nodefaults", "-no-user-config", "-display", "none",
        "-S",
        "-sandbox", SANDBOX,
        "-qmp", f"unix:{paths.qmp},server=on,wait=off",
        "-chardev", f"file,id=serial0,path={paths.console}",
        "-serial", "chardev:serial0",
        "-msg", "timestamp=on",
    ]
    if spec.machine == "q35":
        argv += [
            "-device", f"pcie-root-port,id={topology.Q35_ROOT_PORT},bus=pcie.0,chassis=1,"
                       f"addr=0x{topology.Q35_ROOT_PORT_SLOT:x}",
            "-device", f"pcie-pci-bridge,id={topology.Q35_BRIDGE},bus={topology.Q35_ROOT_PORT},addr=0x0",
        ]
    if spec.boot is not None:
        argv += ["-kernel", spec.boot.kernel]
        if spec.boot.initrd:
            argv += ["-initrd", spec.boot.initrd]
        if spec.boot.cmdline:
            argv += ["-append", spec.boot.cmdline]
    return tuple(argv)


def remote_argv(spec: GuestSpec, dev: DeviceSpec, paths: GuestPaths) -> tuple[str, ...]:
    """The remote process for one device: ours (Contracts 1) or a stock ``-machine x-remote``."""
    if dev.backend == "builtin":
        argv = [PYTHON_PLACEHOLDER, "-m", "mpqemu_mgmt.remote", "--device", dev.model,
                "--fd", FD_PLACEHOLDER, "--qmp", paths.remote_qmp(dev.id)]
        if dev.transport != "mpqemu":
            argv += ["--transport", dev.transport]
        if dev.backing is not None:
            argv += ["--backing-fd", BACKING_FD_PLACEHOLDER]
            if dev.readonly:
                argv += ["--readonly"]
        if dev.poll_us is not None:
            argv += ["--poll-us", str(dev.poll_us)]
        argv += ["--seccomp", "enforce"]
        return tuple(argv)
    props = "".join(f",{k}={v}" for k, v in dev.props)
    argv = [spec.qemu_binary, "-machine", "x-remote", "-nodefaults", "-no-user-config",
            "-display", "none", "-sandbox", SANDBOX]
    if dev.backing is not None:
        ro = "on" if dev.readonly else "off"
        argv += ["-blockdev", f"driver=file,node-name=backing0,filename={dev.backing},read-only={ro}"]
        props += ",drive=backing0"
    argv += [
        "-device", f"{dev.model},id={dev.id}{props}",
        # The socket must arrive at exec: object-add x-remote-object at run time crashed QEMU 7.2.
        "-object", f"x-remote-object,id=robj-{dev.id},devid={dev.id},fd={FD_PLACEHOLDER}",
        "-qmp", f"unix:{paths.remote_qmp(dev.id)},server=on,wait=off",
    ]
    return tuple(argv)


def fill(argv: tuple[str, ...], values: dict[str, str]) -> list[str]:
    """Replace ``{NAME}`` for every NAME of ``values`` (``fd:sock``, ``python``...) in each argument."""
    out = []
    for arg in argv:
        for key, value in values.items():
            arg = arg.replace("{" + key + "}", value)
        out.append(arg)
    return out
