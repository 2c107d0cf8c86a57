"""Pure parts of the service: records' JSON round trip and Contract-4 status fields, metrics text,
the control codec's error reconstruction."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mpqemu_mgmt.errors import EXIT_REFUSED, MigrationRefused, MpqemuError, NotFoundError
from mpqemu_mgmt.service.control import decode, encode, error_from
from mpqemu_mgmt.service.metrics import render
from mpqemu_mgmt.service.records import DeviceRecord, GuestRecord, ProcRecord

ids = st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,10}", fullmatch=True)


@settings(deadline=None)  # a loaded shared host must not turn slowness into failure
@given(name=ids, dev_ids=st.lists(ids, max_size=4, unique=True), pid=st.integers(1, 2**22),
       restarts=st.integers(0, 9), state=st.sampled_from(["defined", "running", "crashed"]))
def test_guest_record_round_trip(name: str, dev_ids: list[str], pid: int, restarts: int, state: str) -> None:
    rec = GuestRecord(
        name=name, spec={"name": name}, state=state, main=ProcRecord(pid, 123, "/x/qmp.sock"),
        devices=tuple(DeviceRecord(i, "edu", proc=ProcRecord(pid + 1), restarts=restarts,
                                   confinement={"seccomp": "enforce", "namespaces": ["net"], "uid": 64000})
                      for i in dev_ids))
    assert GuestRecord.from_dict(encode_decode(rec.to_dict())) == rec


def encode_decode(d: dict[str, object]) -> dict[str, object]:
    return decode(encode(d))  # through the same JSON the store and the control API use


def test_status_has_contract_4_fields() -> None:
    rec = GuestRecord(name="demo", spec={}, state="running", driver="direct",
                      devices=(DeviceRecord("edu0", "edu", "builtin", proc=ProcRecord(42), health="healthy",
                                            confinement={"seccomp": "enforce", "namespaces": ["pid", "net"],
                                                         "uid": 61000}),))
    st_ = rec.status()
    assert {"name", "state", "driver", "devices"} <= set(st_)
    dev = st_["devices"][0]
    assert {"id", "model", "backend", "pid", "health", "restarts", "confinement"} <= set(dev)
    assert dev["pid"] == 42 and dev["health"] == "healthy"
    assert dev["confinement"] == {"seccomp": "enforce", "namespaces": ["pid", "net"], "uid": 61000}


def test_with_device_replaces_in_place() -> None:
    rec = GuestRecord("g", {}, devices=(DeviceRecord("a", "edu"), DeviceRecord("b", "edu")))
    rec2 = rec.with_device(DeviceRecord("a", "edu", restarts=3))
    assert [d.id for d in rec2.devices] == ["a", "b"] and rec2.devices[0].restarts == 3
    assert [d.id for d in rec2.with_device(DeviceRecord("c", "edu")).devices] == ["a", "b", "c"]
    assert [d.id for d in rec2.without_device("a").devices] == ["b"]


def test_error_from_keeps_class_and_exit_code() -> None:
    exc = error_from({"error": "MigrationRefused", "message": "no", "guest": "g", "exit_code": 3})
    assert isinstance(exc, MigrationRefused) and exc.exit_code == EXIT_REFUSED
    assert exc.details == {"guest": "g"}
    assert isinstance(error_from({"error": "NotFoundError", "message": "x"}), NotFoundError)
    odd = error_from({"error": "SystemExit", "message": "x"})  # never instantiate a foreign class
    assert type(odd) is MpqemuError


def test_metrics_text_format() -> None:
    rec = GuestRecord("g\"1", {}, state="running",
                      devices=(DeviceRecord("edu0", "edu", health="healthy", restarts=2),))
    text = render([rec], {("g\"1", "edu0"): 0.0021})
    assert 'mpqemu_guest_running{guest="g\\"1"} 1' in text
    assert 'mpqemu_device_health{guest="g\\"1",device="edu0",state="healthy"} 1' in text
    assert 'mpqemu_device_health{guest="g\\"1",device="edu0",state="hung"} 0' in text
    assert 'mpqemu_device_restarts_total{guest="g\\"1",device="edu0"} 2' in text
    assert 'mpqemu_heartbeat_latency_seconds{guest="g\\"1",process="edu0"} 0.002100' in text
    assert "# TYPE mpqemu_device_restarts_total counter" in text
    assert text.endswith("\n")
