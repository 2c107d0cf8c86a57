"""Plans as data: order, undo, refusals and placement, independent of the golden files."""

from __future__ import annotations

import pytest

from mpqemu_mgmt.domain import topology
from mpqemu_mgmt.domain.spec import DeviceSpec, parse_spec
from mpqemu_mgmt.errors import MigrationRefused, NotFoundError, OneDevicePerProcess, UsageError
from mpqemu_mgmt.orchestrate.plans import Op, plan_for

SPEC = parse_spec('name = "g"\n[[device]]\nid = "a"\nmodel = "edu"\n'
                  '[[device]]\nid = "b"\nmodel = "lsi53c895a"\nbackend = "qemu"\n')


def test_start_order_and_undo() -> None:
    plan = plan_for(SPEC, "start", state_dir="/s")
    ops = [(s.op, s.command, s.device) for s in plan.steps]
    assert ops == [
        (Op.LAUNCH_VM, None, None),
        (Op.LAUNCH_REMOTE, None, "a"), (Op.LAUNCH_REMOTE, None, "b"),
        (Op.QMP, "getfd", "a"), (Op.QMP, "device_add", "a"),
        (Op.QMP, "getfd", "b"), (Op.QMP, "device_add", "b"),
        (Op.QMP, "cont", None),
    ]
    launch_vm = plan.steps[0]
    assert "-S" in launch_vm.argv and any("share=on" in a for a in launch_vm.argv)
    assert any(a.startswith("on,") for a in launch_vm.argv)  # -sandbox on,...
    assert launch_vm.undo[0].op is Op.STOP_VM and launch_vm.undo[0].force
    getfd = plan.steps[3]
    assert getfd.send_fd == "proxy:a" and getfd.undo[0].command == "closefd"
    add = plan.steps[4]
    assert add.arguments == {"driver": "x-pci-proxy-dev", "id": "a", "fd": "mpq-a", "bus": "pci.0",
                             "addr": "0x3"}
    assert plan.steps[6].arguments["addr"] == "0x4"
    stock = plan.steps[2].argv
    assert stock[:3] == ("qemu-system-x86_64", "-machine", "x-remote")
    assert "x-remote-object,id=robj-b,devid=b,fd={fd:sock}" in stock


def test_detach_arms_waiter_and_is_idempotent() -> None:
    plan = plan_for(SPEC, "detach", device_id="a")
    dele, stop = plan.steps
    assert dele.command == "device_del" and dele.wait is not None
    assert dele.wait.matches("DEVICE_DELETED", {"path": "/machine/peripheral/a", "device": "a"})
    assert not dele.wait.matches("DEVICE_DELETED", {"path": "/machine/peripheral/ab"})
    assert (dele.timeout, dele.attempts) == (20.0, 8)
    assert "not found" in dele.done_if_error
    assert stop.op is Op.STOP_REMOTE and not stop.force


def test_hard_reset_keeps_slot() -> None:
    live = {"a": topology.Placement("pci.0", 7), "b": topology.Placement("pci.0", 3)}
    plan = plan_for(SPEC, "reset", device_id="a", placements=live)
    assert plan.action == "hard-reset"
    assert plan.qmp_commands() == ["device_del", "getfd", "device_add"]
    assert plan.steps[-1].arguments["addr"] == "0x7"


def test_attach_avoids_live_slots_and_q35_uses_bridge() -> None:
    live = {"a": topology.Placement("pci.0", 3), "b": topology.Placement("pci.0", 5)}
    dev = DeviceSpec(id="c", model="pci-testdev", backend="qemu")
    plan = plan_for(SPEC, "attach", device=dev, placements=live)
    assert plan.steps[-1].arguments["addr"] == "0x4"
    q35 = parse_spec('name = "q"\nmachine = "q35"\n')
    plan = plan_for(q35, "attach", device=dev)
    assert plan.steps[-1].arguments["bus"] == "pci.2"
    add = plan.steps[-1]
    # An unsure device_add (timeout: a hung remote blocks realize) kills the remote, then unplugs once.
    assert add.undo_if_unsure
    assert [(u.op, u.command, u.force, u.attempts) for u in add.undo] == [
        (Op.STOP_REMOTE, None, True, 1), (Op.QMP, "device_del", False, 1)]


@pytest.mark.parametrize("action", ["migrate", "save", "snapshot"])
def test_migration_family_refused(action: str) -> None:
    with pytest.raises(MigrationRefused) as info:
        plan_for(SPEC, action)
    assert info.value.exit_code == 3 and "do not support migration" in info.value.message


def test_second_device_into_one_remote_refused() -> None:
    dev = DeviceSpec(id="c", model="edu", remote="a")
    with pytest.raises(OneDevicePerProcess):
        plan_for(SPEC, "attach", device=dev)


def test_unknown_action_and_device() -> None:
    with pytest.raises(UsageError):
        plan_for(SPEC, "explode")
    with pytest.raises(NotFoundError):
        plan_for(SPEC, "detach", device_id="zz")


def test_slots_run_out() -> None:
    from mpqemu_mgmt.errors import RefusedError

    with pytest.raises(RefusedError, match="no free PCI slot"):
        topology.place("pc", [f"d{i}" for i in range(40)])


def test_vfio_user_transport_plan() -> None:
    spec = parse_spec('name = "v"\n[[device]]\nid = "a"\nmodel = "edu"\ntransport = "vfio-user"\n')
    plan = plan_for(spec, "start", state_dir="/s")
    # QEMU's vfio-user-pci refuses the fd form: listen on a path, no getfd.
    assert plan.qmp_commands() == ["device_add", "cont"]
    listen, add = plan.steps[1], plan.steps[2]
    assert listen.arguments == {"listen": "/s/vfu/a.sock"} and "--transport" in listen.argv
    assert add.arguments["driver"] == "vfio-user-pci"
    assert add.arguments["socket"] == {"type": "unix", "path": "/s/vfu/a.sock"}


def test_libvirt_start_is_paused_create() -> None:
    spec = parse_spec('name = "l"\ndriver = "libvirt"\n')
    step = plan_for(spec, "start").steps[0]
    assert step.command == "createWithFlags" and step.arguments["flags"] == ["VIR_DOMAIN_START_PAUSED"]
