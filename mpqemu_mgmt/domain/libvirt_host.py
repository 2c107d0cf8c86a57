"""The libvirt connection owner and domain handle: the ONLY module that imports ``libvirt``.

:class:`LibvirtHost` owns one connection per URI and the libvirt event loop, which runs in its own
native thread (``virEventRegisterDefaultImpl`` before the connection opens, then
``virEventRunDefaultImpl`` in a loop: what Nova's ``nova/virt/libvirt/host.py`` does).
:class:`LibvirtGuest` wraps one ``virDomain`` with small blocking calls the channel runs in
worker threads. Callbacks registered here run on the event thread and must only hand data over.
Every libvirt failure becomes :class:`~mpqemu_mgmt.errors.LibvirtError` with libvirt's code and
text. Must not decide policy (the designer and drivers do) and must not build XML.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import libvirt
import libvirt_qemu

from mpqemu_mgmt.errors import LibvirtError

T = TypeVar("T")
EventCallback = Callable[[str, dict[str, Any]], None]

_loop_lock = threading.Lock()
_loop_started = False


def _ensure_event_loop() -> None:
    """Register libvirt's default event implementation once and run it in a daemon thread."""
    global _loop_started
    with _loop_lock:
        if _loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _loop_started = True


def _call(what: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except libvirt.libvirtError as exc:
        raise LibvirtError(f"libvirt {what}: {exc.get_error_message()}", call=what,
                           code=exc.get_error_code(), desc=exc.get_error_message()) from exc


class LibvirtGuest:
    """One libvirt domain (blocking calls; run them in a worker thread from async code)."""

    def __init__(self, host: LibvirtHost, dom: Any) -> None:
        self._host = host
        self._dom = dom

    @property
    def name(self) -> str:
        return str(self._dom.name())

    def uuid(self) -> str:
        return str(_call("UUIDString", self._dom.UUIDString))

    def create_paused(self) -> None:
        _call("createWithFlags(START_PAUSED)",
              lambda: self._dom.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED))

    def resume(self) -> None:
        _call("resume", self._dom.resume)

    def suspend(self) -> None:
        _call("suspend", self._dom.suspend)

    def reset(self) -> None:
        _call("reset", lambda: self._dom.reset(0))

    def shutdown(self) -> None:
        _call("shutdown", self._dom.shutdown)

    def destroy(self) -> None:
        if self.is_active():
            _call("destroy", self._dom.destroy)

    def undefine(self) -> None:
        _call("undefine", self._dom.undefine)

    def is_active(self) -> bool:
        return bool(_call("isActive", self._dom.isActive))

    def state(self) -> tuple[int, int]:
        st = _call("state", self._dom.state)
        return int(st[0]), int(st[1])

    def is_paused(self) -> bool:
        return bool(self.state()[0] == libvirt.VIR_DOMAIN_PAUSED)

    def xml_desc(self, inactive: bool = False) -> str:
        flags = libvirt.VIR_DOMAIN_XML_INACTIVE if inactive else 0
        return str(_call("XMLDesc", lambda: self._dom.XMLDesc(flags)))

    def pid(self) -> int:
        """Main QEMU pid from libvirt's pid file (0 if not readable)."""
        path = Path(f"/run/libvirt/qemu/{self.name}.pid")
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return 0

    def messages(self) -> list[str]:
        """libvirt's messages for the domain: taint flags (``custom-monitor`` once QMP passthrough
        was used) and deprecations (virDomainGetMessages, libvirt ≥ 7.1)."""
        return [str(m) for m in _call("messages", lambda: self._dom.messages(0))]

    def console_log(self) -> str:
        return f"/var/log/libvirt/qemu/{self.name}.log"

    def monitor_command(self, cmd: str, fd: int | None) -> str:
        """QMP passthrough; with ``fd``, one fd rides along (qemuMonitorCommandWithFiles, libvirt ≥ 8.2)."""
        if fd is None:
            return str(_call("qemuMonitorCommand",
                             lambda: libvirt_qemu.qemuMonitorCommand(self._dom, cmd, 0)))
        result = _call("qemuMonitorCommandWithFiles",
                       lambda: libvirt_qemu.qemuMonitorCommandWithFiles(self._dom, cmd, [fd], 0))
        return str(result[0])

    def on_qemu_event(self, callback: EventCallback) -> Callable[[], None]:
        """Deliver this domain's raw QMP events to ``callback(name, data)`` on the event thread."""

        def relay(_conn: Any, _dom: Any, event: str, _sec: int, _usec: int, details: Any,
                  _opaque: Any) -> None:
            data: dict[str, Any] = {}
            if isinstance(details, str) and details:
                try:
                    loaded = json.loads(details)
                    data = loaded if isinstance(loaded, dict) else {}
                except ValueError:
                    data = {}
            elif isinstance(details, dict):
                data = details
            callback(str(event), data)

        conn = self._host.conn
        cb_id = _call("qemuMonitorEventRegister",
                      lambda: libvirt_qemu.qemuMonitorEventRegister(conn, self._dom, None, relay, None, 0))

        def unregister() -> None:
            with contextlib.suppress(libvirt.libvirtError):
                libvirt_qemu.qemuMonitorEventDeregister(conn, cb_id)

        return unregister


class LibvirtHost:
    """One connection to libvirtd at ``uri`` (opened lazily, after the event loop is running)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._conn: Any = None
        self._lock = threading.Lock()

    @property
    def conn(self) -> Any:
        with self._lock:
            if self._conn is None:
                _ensure_event_loop()
                self._conn = _call(f"open {self.uri}", lambda: libvirt.open(self.uri))
            return self._conn

    def alive(self) -> bool:
        """Is the open connection still usable? False once libvirtd went away (a restart): the
        remote driver marks its client closed on EOF, and virConnectIsAlive reads that flag
        without a round trip (remoteConnectIsAlive, src/remote/remote_driver.c)."""
        with self._lock:
            if self._conn is None:
                return True  # nothing opened yet: opening will tell
            try:
                return bool(self._conn.isAlive())
            except libvirt.libvirtError:
                return False

    def define(self, xml: str) -> LibvirtGuest:
        return LibvirtGuest(self, _call("defineXML", lambda: self.conn.defineXML(xml)))

    def define_validated(self, xml: str) -> LibvirtGuest:
        """``virsh define --validate``: libvirtd checks the XML against its RNG schema."""
        flags = libvirt.VIR_DOMAIN_DEFINE_VALIDATE
        return LibvirtGuest(self, _call("defineXMLFlags", lambda: self.conn.defineXMLFlags(xml, flags)))

    def lookup(self, name: str) -> LibvirtGuest | None:
        try:
            return LibvirtGuest(self, self.conn.lookupByName(name))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise LibvirtError(f"libvirt lookupByName: {exc.get_error_message()}", call="lookupByName",
                               code=exc.get_error_code(), desc=exc.get_error_message()) from exc

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    self._conn.close()
                self._conn = None
