"""Plans: what an action will do to a guest, as pure data (DESIGN.md "effects as data").

``plan_for(spec, action, **kw) -> Plan`` lists the steps (main-QEMU launch, remote argv, every QMP
command with the fd it carries and the event it waits for) and, on each step, the steps that undo
it. The runner executes a plan over a monitor channel and, on failure, runs the undo steps of the
steps already done in reverse order. ``Plan.to_json()`` is what ``mpqemu-mgmt plan NAME ACTION``
prints and what the golden files in ``qmp/`` hold. This module must not do IO, open sockets or read
the clock: given the same spec and arguments it returns the same plan.

Actions:

Each remote's ``argv`` is what the launcher that runs it executes (``remote_command``, the
launcher's own renderer: for the confined launcher ``prlimit ... -- bwrap ... -- python ...``),
with the fd numbers it assigns as ``{fd:NAME}`` placeholders.

* ``start``: main QEMU paused; every remote (socketpair + confined remote; started concurrently);
  per device ``getfd`` carrying the proxy end (SCM_RIGHTS) and
  ``device_add x-pci-proxy-dev,id=…,fd=<name>,bus=…,addr=…``; then ``cont``.
  libvirt cannot hand an fd to QEMU at exec (virCommand closes unlisted fds), hence paused + getfd.
* ``attach`` (hot-plug): the per-device steps of ``start``.
* ``detach`` (hot-unplug): ``device_del`` with the ``DEVICE_DELETED`` waiter armed first (path
  ``/machine/peripheral/<id>``), 20 s × 8 attempts, "not found" counts as done (Nova's
  ``_detach_from_live_and_wait_for_event``); then the remote is stopped (it exits by itself once
  QEMU closes the proxy end).
* ``reset``: ``system_reset``; the proxy forwards ``MPQEMU_CMD_DEVICE_RESET`` to every remote
  (hw/remote/proxy.c ``proxy_device_reset``).
* ``hard-reset``: one device: detach, a fresh remote, attach.
* ``stop``: the guest (graceful or ``force``), then every remote.
* ``migrate``/``save``/``snapshot``: refused with :class:`MigrationRefused` before anything runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Final

from mpqemu_mgmt.domain import topology
from mpqemu_mgmt.domain.spec import DeviceSpec, GuestSpec, check_fd_passing
from mpqemu_mgmt.errors import MigrationRefused, NotFoundError, OneDevicePerProcess, UsageError
from mpqemu_mgmt.orchestrate.qemu_argv import GuestPaths, main_argv, remote_argv

JSON = Any
#: How the launcher that will run a device's remote renders its argv (RemoteLauncher.command):
#: the plan shows exactly that. The default is the unconfined ProcessLauncher's command line.
RemoteCommand = Callable[[GuestSpec, DeviceSpec, GuestPaths], tuple[str, ...]]
DEFAULT_STATE_ROOT: Final = "/run/mpqemu-mgmt"
#: Nova's defaults (nova/conf/libvirt.py device_detach_timeout / device_detach_attempts).
DETACH_TIMEOUT: Final = 20.0
DETACH_ATTEMPTS: Final = 8
QMP_TIMEOUT: Final = 10.0
REMOTE_START_TIMEOUT: Final = 10.0
REMOTE_EXIT_TIMEOUT: Final = 5.0
VM_STOP_TIMEOUT: Final = 30.0
#: QEMU's messages: "Device '%s' not found" (qdev-monitor.c find_device_state) and "File descriptor
#: named '%s' not found" (monitor/fds.c qmp_closefd) mean the thing is already gone.
ERR_NOT_FOUND: Final = "not found"
#: qdev-monitor.c qmp_device_del refuses a second request while the first is pending. In 7.2 an
#: ACPI request is pending until the guest acts (the expiry came in 8.0), so a retry just keeps
#: waiting for the same DEVICE_DELETED; a request sent before the guest OS runs is never acted on.
ERR_UNPLUG_PENDING: Final = "already in the process of unplug"

ACTIONS: Final = ("start", "attach", "detach", "reset", "hard-reset", "stop")
REFUSED_ACTIONS: Final = ("migrate", "save", "snapshot")


class Op(StrEnum):
    LAUNCH_VM = "launch-vm"          # direct: exec argv; libvirt: define + create paused
    LAUNCH_REMOTE = "launch-remote"  # socketpair, confined remote with one end; keep the other
    QMP = "qmp"                      # one command on the main QEMU's monitor
    STOP_REMOTE = "stop-remote"      # wait for exit (timeout), then SIGTERM, then SIGKILL
    STOP_VM = "stop-vm"              # powerdown / quit (direct) or shutdown / destroy (libvirt)


@dataclass(frozen=True)
class EventWait:
    """A QMP event to wait for; armed before the step's command is sent."""

    event: str
    match: tuple[tuple[str, str], ...] = ()

    def matches(self, name: str, data: Mapping[str, JSON]) -> bool:
        return name == self.event and all(data.get(k) == v for k, v in self.match)

    def to_dict(self) -> dict[str, JSON]:
        return {"event": self.event, "match": dict(self.match)}


@dataclass(frozen=True)
class Step:
    op: Op
    device: str | None = None
    #: QMP command and arguments (Op.QMP), or the libvirt call for Op.LAUNCH_VM under libvirt.
    command: str | None = None
    arguments: Mapping[str, JSON] = field(default_factory=dict)
    #: A held fd sent with the command over SCM_RIGHTS: ``proxy:<device id>``.
    send_fd: str | None = None
    wait: EventWait | None = None
    timeout: float = QMP_TIMEOUT
    attempts: int = 1
    #: QMP error texts meaning "already done" (idempotent detach), or "still pending: keep waiting".
    done_if_error: tuple[str, ...] = ()
    wait_if_error: tuple[str, ...] = ()
    argv: tuple[str, ...] = ()
    force: bool = False
    undo: tuple[Step, ...] = ()
    #: Run ``undo`` also when this step itself timed out or lost its peer: it may have happened.
    undo_if_unsure: bool = False
    why: str = ""

    def to_dict(self) -> dict[str, JSON]:
        out: dict[str, JSON] = {"op": self.op.value}
        if self.device is not None:
            out["device"] = self.device
        if self.command is not None:
            out["command"] = self.command
        if self.arguments:
            out["arguments"] = dict(self.arguments)
        if self.send_fd is not None:
            out["send_fd"] = self.send_fd
        if self.wait is not None:
            out["wait"] = self.wait.to_dict()
        out["timeout"] = self.timeout
        if self.attempts != 1:
            out["attempts"] = self.attempts
        if self.done_if_error:
            out["done_if_error"] = list(self.done_if_error)
        if self.wait_if_error:
            out["wait_if_error"] = list(self.wait_if_error)
        if self.argv:
            out["argv"] = list(self.argv)
        if self.force:
            out["force"] = True
        if self.undo:
            out["undo"] = [u.to_dict() for u in self.undo]
        if self.undo_if_unsure:
            out["undo_if_unsure"] = True
        if self.why:
            out["why"] = self.why
        return out


@dataclass(frozen=True)
class Plan:
    guest: str
    action: str
    driver: str
    steps: tuple[Step, ...]

    def to_dict(self) -> dict[str, JSON]:
        return {"guest": self.guest, "action": self.action, "driver": self.driver,
                "steps": [s.to_dict() for s in self.steps]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def qmp_commands(self) -> list[str]:
        """The QMP command names in order (for summaries and tests)."""
        return [s.command for s in self.steps if s.op is Op.QMP and s.command]


def fd_name(device_id: str) -> str:
    """The ``getfd`` name of a device's proxy socket end."""
    return f"mpq-{device_id}"


def proxy_fd_ref(device_id: str) -> str:
    return f"proxy:{device_id}"


def device_path(device_id: str) -> str:
    """QOM path of a ``-device``/``device_add`` with an id (qdev_set_id puts it under peripheral)."""
    return f"/machine/peripheral/{device_id}"


def _stop_remote(dev_id: str, *, force: bool, why: str = "") -> Step:
    return Step(Op.STOP_REMOTE, device=dev_id, timeout=0.0 if force else REMOTE_EXIT_TIMEOUT,
                force=force, why=why)


def _qmp(command: str, args: Mapping[str, JSON] | None = None, **kw: Any) -> Step:
    return Step(Op.QMP, command=command, arguments=dict(args or {}), **kw)


def plug_steps(spec: GuestSpec, dev: DeviceSpec, place: topology.Placement, paths: GuestPaths, *,
               undo_device_add: bool, remote_command: RemoteCommand = remote_argv) -> tuple[Step, ...]:
    """socketpair + remote, getfd with the proxy end, device_add (hot-plug and start)."""
    name = fd_name(dev.id)
    # device_add of a proxy waits for the remote inside realize (hw/remote/proxy.c probes its config
    # space) with QEMU's monitor blocked; a hung remote means a timeout, after which realize may
    # still complete once the remote dies. So the undo of an unsure device_add kills the remote
    # first (unblocking QEMU), then unplugs whatever got realized (one attempt: a rollback must
    # end). In a start, stopping the VM removes the device itself.
    undo: tuple[Step, ...] = (_stop_remote(dev.id, force=True),)
    if undo_device_add:
        unplug = replace(unplug_steps(dev.id)[0], attempts=1, undo=())
        undo += (unplug,)
    if dev.transport == "vfio-user":
        # QEMU >= 10.1 vfio-user-pci connects to a UNIX path and refuses the fd form ("Unsupported
        # socket type fd", hw/vfio-user/pci.c): listen on a path in the state dir's private vfu/
        # directory (0700, the main QEMU's uid), accept the connection QEMU makes while
        # device_add's realize waits for VERSION, unlink the path, and start the (confined) remote
        # on that connection. A replug or hard reset binds the path afresh for a fresh device_add.
        sock = paths.vfio_user_socket(dev.id)
        listen = Step(
            Op.LAUNCH_REMOTE, device=dev.id, argv=remote_command(spec, dev, paths),
            arguments={"listen": sock},
            timeout=REMOTE_START_TIMEOUT, undo=(_stop_remote(dev.id, force=True),),
            why="vfio-user: the remote starts on the connection QEMU makes to this path",
        )
        add = _qmp("device_add", {"driver": "vfio-user-pci", "id": dev.id,
                                  "socket": {"type": "unix", "path": sock},
                                  "bus": place.bus, "addr": place.addr},
                   device=dev.id, undo=undo, undo_if_unsure=True)
        return (listen, add)
    # x-pci-proxy-dev resolves fd with monitor_fd_param, so a getfd name works (hw/remote/proxy.c).
    add_args: dict[str, JSON] = {"driver": "x-pci-proxy-dev", "id": dev.id, "fd": name,
                                 "bus": place.bus, "addr": place.addr}
    launch = Step(
        Op.LAUNCH_REMOTE, device=dev.id, argv=remote_command(spec, dev, paths),
        timeout=REMOTE_START_TIMEOUT,
        undo=(_stop_remote(dev.id, force=True),),
        why="one device per process; the socket end is inherited at exec",
    )
    getfd = _qmp(
        "getfd", {"fdname": name}, device=dev.id, send_fd=proxy_fd_ref(dev.id),
        undo=(_qmp("closefd", {"fdname": name}, device=dev.id, done_if_error=(ERR_NOT_FOUND,)),),
        why="hand QEMU the proxy end over SCM_RIGHTS",
    )
    add = _qmp("device_add", add_args, device=dev.id, undo=undo, undo_if_unsure=True)
    return (launch, getfd, add)


def unplug_steps(device_id: str) -> tuple[Step, ...]:
    return (
        _qmp(
            "device_del", {"id": device_id}, device=device_id,
            wait=EventWait("DEVICE_DELETED", (("path", device_path(device_id)),)),
            timeout=DETACH_TIMEOUT, attempts=DETACH_ATTEMPTS,
            done_if_error=(ERR_NOT_FOUND,), wait_if_error=(ERR_UNPLUG_PENDING,),
            # Once the device is gone there is no going back: if a later step fails, the
            # compensation is to make sure its remote does not outlive it.
            undo=(_stop_remote(device_id, force=True),),
            why="the guest must acknowledge (ACPI/SHPC); the waiter is armed first",
        ),
        _stop_remote(device_id, force=False, why="exits once QEMU closes the proxy end"),
    )


def _launch_vm(spec: GuestSpec, paths: GuestPaths) -> Step:
    undo = (Step(Op.STOP_VM, force=True, timeout=VM_STOP_TIMEOUT),)
    if spec.driver == "libvirt":
        return Step(Op.LAUNCH_VM, command="createWithFlags",
                    arguments={"uri": spec.uri, "domain": spec.name, "flags": ["VIR_DOMAIN_START_PAUSED"]},
                    timeout=60.0, undo=undo,
                    why="libvirt cannot pass the sockets at exec: start paused, plug, resume")
    return Step(Op.LAUNCH_VM, argv=main_argv(spec, paths), timeout=30.0, undo=undo,
                why="paused (-S) so the guest never runs without its devices")


def refuse(spec: GuestSpec, action: str) -> None:
    """Raise the refusal for ``action`` if there is one (migration, save, snapshots)."""
    if action in REFUSED_ACTIONS:
        # x-pci-proxy-dev registers a migration blocker (hw/remote/proxy.c, "%s does not support
        # migration"); save and snapshots go through migration, so all three fail in QEMU anyway.
        raise MigrationRefused(
            f"guest {spec.name!r}: {action} refused: x-pci-proxy-dev devices do not support migration "
            "(save and snapshots migrate too); stop the guest instead",
            guest=spec.name, action=action,
        )


def plan_for(
    spec: GuestSpec,
    action: str,
    *,
    state_dir: str | None = None,
    device: DeviceSpec | None = None,
    device_id: str | None = None,
    placements: Mapping[str, topology.Placement] | None = None,
    force: bool = False,
    remote_command: RemoteCommand = remote_argv,
) -> Plan:
    """The plan for ``action`` on a guest whose current devices are ``spec.devices``.

    ``attach`` takes ``device``; ``detach`` and ``hard-reset`` take ``device_id``; ``reset`` with a
    ``device_id`` is ``hard-reset``. ``placements`` are the live slots (hot-plug must not reuse them).
    ``remote_command`` renders each remote's argv: pass the launcher's ``command`` (the driver
    does), so the plan shows what that launcher executes.
    """
    refuse(spec, action)
    if action == "reset" and device_id is not None:
        action = "hard-reset"
    if action not in ACTIONS:
        raise UsageError(f"unknown action {action!r} (one of {', '.join(ACTIONS + REFUSED_ACTIONS)})",
                         action=action)
    paths = GuestPaths(state_dir or f"{DEFAULT_STATE_ROOT}/{spec.name}")
    steps: list[Step] = []
    if action == "start":
        check_fd_passing(spec)
        places = topology.place(spec.machine, [d.id for d in spec.devices], placements)
        steps.append(_launch_vm(spec, paths))
        plugs = [plug_steps(spec, dev, places[dev.id], paths, undo_device_add=False,
                            remote_command=remote_command) for dev in spec.devices]
        # All remotes first (the runner starts consecutive launch-remote steps concurrently), then
        # getfd + device_add one by one. No device_add undo here: stopping the paused VM removes
        # every device at once, and an ACPI unplug with no guest OS would only time out.
        steps += [plug[0] for plug in plugs]
        for plug in plugs:
            steps += plug[1:]
        steps.append(_qmp("cont", why="run the guest once every device is realized"))
    elif action == "attach":
        if device is None:
            raise UsageError("attach needs a device", action=action)
        for other in spec.devices:
            if other.remote_name == device.remote_name and other.id != device.id:
                raise OneDevicePerProcess(
                    f"guest {spec.name!r}: remote {device.remote_name!r} already serves {other.id!r}; "
                    "a remote process serves exactly one device",
                    guest=spec.name, device=device.id, remote=device.remote_name,
                )
        full = spec.with_device(device)
        check_fd_passing(full)
        taken = dict(placements) if placements is not None else topology.place(
            spec.machine, [d.id for d in spec.devices])
        places = topology.place(spec.machine, [device.id], taken)
        steps += plug_steps(full, device, places[device.id], paths, undo_device_add=True,
                            remote_command=remote_command)
    elif action == "detach":
        dev = _need_device(spec, device_id)
        steps += unplug_steps(dev.id)
    elif action == "hard-reset":
        dev = _need_device(spec, device_id)
        check_fd_passing(spec)
        taken = dict(placements) if placements is not None else topology.place(
            spec.machine, [d.id for d in spec.devices])
        steps += unplug_steps(dev.id)
        steps += plug_steps(spec, dev, taken[dev.id], paths, undo_device_add=True,
                            remote_command=remote_command)
    elif action == "reset":
        steps.append(_qmp("system_reset", why="the proxies forward DEVICE_RESET to every remote"))
    elif action == "stop":
        steps.append(Step(Op.STOP_VM, force=force, timeout=VM_STOP_TIMEOUT))
        steps += [_stop_remote(d.id, force=False) for d in spec.devices]
    return Plan(spec.name, action, spec.driver, tuple(steps))


def _need_device(spec: GuestSpec, device_id: str | None) -> DeviceSpec:
    if device_id is None:
        raise UsageError("this action needs a device id")
    for dev in spec.devices:
        if dev.id == device_id:
            return dev
    raise NotFoundError(f"guest {spec.name!r} has no device {device_id!r}", guest=spec.name, device=device_id)
