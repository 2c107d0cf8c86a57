"""The runner against in-memory fakes: order of effects, the waiter armed before the command,
retries, idempotent errors, rollback in reverse order, held fds closed on every path."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpqemu_mgmt.domain.spec import DeviceSpec, parse_spec
from mpqemu_mgmt.errors import OrchestrationError, ProcessFailed, StepTimeout
from mpqemu_mgmt.orchestrate.channel import QmpCommandError
from mpqemu_mgmt.orchestrate.plans import EventWait, Plan, Step, plan_for
from mpqemu_mgmt.orchestrate.processes import Spawned
from mpqemu_mgmt.orchestrate.runner import Runner
from mpqemu_mgmt.orchestrate.runtime import GuestRuntime, RemoteRuntime

SPEC = parse_spec('name = "g"\n[[device]]\nid = "a"\nmodel = "edu"\n'
                  '[[device]]\nid = "b"\nmodel = "lsi53c895a"\nbackend = "qemu"\n')


class Log(list[str]):
    pass


class FakeWaiter:
    def __init__(self, chan: FakeChannel, wait: EventWait) -> None:
        self.chan, self.wait_for = chan, wait
        chan.log.append(f"arm {wait.event}")

    async def wait(self, timeout: float) -> dict[str, Any]:
        if self.chan.events:
            return self.chan.events.pop(0)
        raise StepTimeout("no event")

    def close(self) -> None:
        self.chan.log.append("disarm")


class FakeChannel:
    def __init__(self, log: Log, errors: Mapping[str, list[str]] | None = None,
                 events: list[dict[str, Any]] | None = None) -> None:
        self.log = log
        self.errors = {k: list(v) for k, v in (errors or {}).items()}
        self.events = list(events or [])
        self.fds: list[int] = []
        self.hangs: set[str] = set()

    async def execute(self, command: str, arguments: Mapping[str, Any] | None = None, *,
                      timeout: float) -> Any:
        self.log.append(command)
        if command in self.hangs:
            raise StepTimeout(f"{command}: no answer")
        pending = self.errors.get(command)
        if pending:
            raise QmpCommandError(command, "GenericError", pending.pop(0))
        return {}

    async def send_fd(self, fd: int, fdname: str, *, timeout: float) -> None:
        self.fds.append(fd)
        await self.execute("getfd", {"fdname": fdname}, timeout=timeout)

    def arm(self, wait: EventWait) -> FakeWaiter:
        return FakeWaiter(self, wait)

    async def close(self) -> None:
        self.log.append("close")


class FakeLauncher:
    def __init__(self, log: Log, fail: str | None = None) -> None:
        self.log, self.fail = log, fail
        self.socks: list[socket.socket] = []

    async def launch(self, device_id: str, argv: Sequence[str], **kw: Any) -> Spawned:
        self.log.append(f"launch {device_id}")
        if device_id == self.fail:
            raise ProcessFailed(f"remote {device_id} died")
        ours, theirs = socket.socketpair()
        theirs.close()
        self.socks.append(ours)
        return Spawned(RemoteRuntime(device_id, 1000 + len(self.socks), "q", "l"), ours)

    async def stop(self, remote: RemoteRuntime, *, timeout: float, force: bool) -> None:
        self.log.append(f"stop {remote.device_id}{' force' if force else ''}")


class FakeVm:
    def __init__(self, log: Log, channel: FakeChannel) -> None:
        self.log, self.channel = log, channel

    async def launch_vm(self, step: Step, runtime: GuestRuntime) -> FakeChannel:
        self.log.append("launch-vm")
        return self.channel

    async def stop_vm(self, step: Step, runtime: GuestRuntime, channel: object) -> None:
        self.log.append("stop-vm" + (" force" if step.force else ""))


def runner(log: Log, chan: FakeChannel, launcher: FakeLauncher, *, channel: bool = False,
           before: Any = None) -> Runner:
    rt = GuestRuntime(SPEC, "direct", "/s", 0, "/s/qmp.sock", "/s/console.log")
    devices = {d.id: d for d in SPEC.devices} | {"c": DeviceSpec(id="c", model="edu")}
    return Runner(rt, FakeVm(log, chan), launcher, chan if channel else None, devices, before_step=before)


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_start_effects_in_order() -> None:
    log = Log()
    launcher = FakeLauncher(log)
    r = runner(log, FakeChannel(log), launcher)
    run(r.run(plan_for(SPEC, "start")))
    assert log[0] == "launch-vm"
    assert sorted(log[1:3]) == ["launch a", "launch b"]  # started together
    assert log[3:] == ["getfd", "device_add", "getfd", "device_add", "cont"]
    assert all(s.fileno() == -1 for s in launcher.socks), "proxy ends must be closed once QEMU has them"
    assert set(r.runtime.remotes) == {"a", "b"}
    assert r.runtime.remotes["a"].placement is not None


@pytest.mark.parametrize("fail", ["a", "b"])
def test_remote_failure_rolls_back_everything(fail: str) -> None:
    log = Log()
    launcher = FakeLauncher(log, fail=fail)
    r = runner(log, FakeChannel(log), launcher)
    with pytest.raises(ProcessFailed) as info:
        run(r.run(plan_for(SPEC, "start")))
    other = "b" if fail == "a" else "a"
    assert log[-2:] == [f"stop {other} force", "stop-vm force"]
    assert info.value.details["rolled_back"] == [f"stop-remote {other}", "stop-vm"]
    assert all(s.fileno() == -1 for s in launcher.socks)


def test_device_add_error_undoes_getfd_then_remote() -> None:
    log = Log()
    chan = FakeChannel(log, errors={"device_add": ["Bus 'pcie.0' does not support hotplugging"]})
    r = runner(log, chan, FakeLauncher(log), channel=True)
    dev = DeviceSpec(id="c", model="edu")
    with pytest.raises(QmpCommandError, match="hotplugging"):
        run(r.run(plan_for(SPEC, "attach", device=dev)))
    assert log == ["launch c", "getfd", "device_add", "closefd", "stop c force"]
    assert "c" not in r.runtime.remotes


def test_unplug_arms_waiter_before_device_del_and_retries() -> None:
    log = Log()
    # attempt 1: "already in the process of unplug" (keep waiting), no event; attempt 2: the event
    chan = FakeChannel(log, errors={"device_del": ["Device a is already in the process of unplug"]})
    r = runner(log, chan, FakeLauncher(log), channel=True)
    r.runtime.remotes["a"] = RemoteRuntime("a", 1, "q", "l")
    plan = plan_for(SPEC, "detach", device_id="a")
    waits = iter([None, {"path": "/machine/peripheral/a"}])

    async def wait(self: FakeWaiter, timeout: float) -> dict[str, Any]:
        got = next(waits)
        if got is None:
            raise StepTimeout("no event")
        return got

    FakeWaiter.wait, saved = wait, FakeWaiter.wait  # type: ignore[method-assign]
    try:
        run(r.run(plan))
    finally:
        FakeWaiter.wait = saved  # type: ignore[method-assign]
    assert log == ["arm DEVICE_DELETED", "device_del", "disarm",
                   "arm DEVICE_DELETED", "device_del", "disarm", "stop a"]


def test_unplug_gives_up_after_attempts() -> None:
    log = Log()
    r = runner(log, FakeChannel(log), FakeLauncher(log), channel=True)
    r.runtime.remotes["a"] = RemoteRuntime("a", 1, "q", "l")
    plan = plan_for(SPEC, "detach", device_id="a")
    with pytest.raises(StepTimeout, match="after 8 attempts"):
        run(r.run(plan))
    assert log.count("device_del") == 8
    assert "stop a" not in log and "a" in r.runtime.remotes  # the device is still there: keep its remote


def test_unplug_of_missing_device_is_done() -> None:
    log = Log()
    chan = FakeChannel(log, errors={"device_del": ["Device 'a' not found"]})
    r = runner(log, chan, FakeLauncher(log), channel=True)
    r.runtime.remotes["a"] = RemoteRuntime("a", 1, "q", "l")
    run(r.run(plan_for(SPEC, "detach", device_id="a")))
    assert log == ["arm DEVICE_DELETED", "device_del", "disarm", "stop a"]


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=0, max_value=7))
def test_injected_failure_anywhere_in_start_undoes_all(at: int) -> None:
    log = Log()
    launcher = FakeLauncher(log)

    def before(index: int, step: Step) -> None:
        if index == at:
            raise OrchestrationError("injected")

    r = runner(log, FakeChannel(log), launcher, before=before)
    plan: Plan = plan_for(SPEC, "start")
    with pytest.raises(OrchestrationError, match="injected"):
        run(r.run(plan))
    launched = {e.split()[1] for e in log if e.startswith("launch ")}
    stopped = {e.split()[1] for e in log if e.startswith("stop ") and e != "stop-vm force"}
    assert launched == stopped
    assert ("launch-vm" in log) == ("stop-vm force" in log)
    assert log.count("getfd") == log.count("closefd")  # no named fd left in QEMU
    assert all(s.fileno() == -1 for s in launcher.socks)


def test_device_add_timeout_kills_remote_then_unplugs() -> None:
    """A hung remote blocks QEMU inside realize; the device may appear once the remote dies."""
    log = Log()
    chan = FakeChannel(log)
    chan.hangs.add("device_add")
    r = runner(log, chan, FakeLauncher(log), channel=True)
    with pytest.raises(StepTimeout):
        run(r.run(plan_for(SPEC, "attach", device=DeviceSpec(id="c", model="edu"))))
    assert log == ["launch c", "getfd", "device_add",
                   "stop c force",                                 # unblocks QEMU first
                   "arm DEVICE_DELETED", "device_del", "disarm",   # one unplug attempt
                   "closefd"]
    assert "c" not in r.runtime.remotes


def test_refused_device_add_is_not_unsure() -> None:
    """An error reply means QEMU did not add it: no unplug in the rollback."""
    log = Log()
    chan = FakeChannel(log, errors={"device_add": ["Duplicate device ID 'c'"]})
    r = runner(log, chan, FakeLauncher(log), channel=True)
    with pytest.raises(QmpCommandError):
        run(r.run(plan_for(SPEC, "attach", device=DeviceSpec(id="c", model="edu"))))
    assert "device_del" not in log


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=0, max_value=5), st.data())
def test_any_start_any_failure_point(n: int, data: st.DataObject) -> None:
    """For any number of devices and any failing step, every resource taken is given back."""
    text = 'name = "g"\n' + "".join(f'[[device]]\nid = "d{i}"\nmodel = "edu"\n' for i in range(n))
    spec = parse_spec(text)
    plan = plan_for(spec, "start")
    at = data.draw(st.integers(min_value=0, max_value=len(plan.steps) - 1))
    log = Log()
    launcher = FakeLauncher(log)

    def before(index: int, step: Step) -> None:
        if index == at:
            raise OrchestrationError("injected")

    rt = GuestRuntime(spec, "direct", "/s", 0, "/s/qmp.sock", "/s/console.log")
    r = Runner(rt, FakeVm(log, FakeChannel(log)), launcher, None, {d.id: d for d in spec.devices},
               before_step=before)
    with pytest.raises(OrchestrationError):
        run(r.run(plan))
    launched = {e.split()[1] for e in log if e.startswith("launch ")}
    stopped = {e.split()[1] for e in log if e.startswith("stop ") and not e.startswith("stop-vm")}
    assert launched == stopped and not rt.remotes
    assert log.count("getfd") == log.count("closefd")
    assert ("launch-vm" in log) == ("stop-vm force" in log)
    assert all(s.fileno() == -1 for s in launcher.socks)
