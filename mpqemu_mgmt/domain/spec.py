"""The guest spec (DESIGN.md Contracts 5): TOML text → frozen, typed :class:`GuestSpec`.

Pure: parses and validates text or already-loaded tables; :func:`load_spec` is the one function
that reads a file. Every problem raises :class:`~mpqemu_mgmt.errors.SpecError` naming the file,
the key (``device[1].model``) and what is wrong. Must not start processes, talk to QEMU or libvirt,
or apply defaults that depend on the host (those belong to the designer and the drivers).

Refusals that depend on the spec alone are raised here too, before anything changes: two devices
naming one remote process (``OneDevicePerProcess``: QEMU's ``x-remote-object`` has ``max_devs = 1``,
hw/remote/remote-obj.c) and fd passing over a non-local libvirt URI (``NonLocalUri``: libvirt's
``virDomainQemuMonitorCommandWithFiles`` only works over a local UNIX-socket connection,
src/libvirt-qemu.c).
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal, cast
from urllib.parse import urlsplit

from mpqemu_mgmt.errors import NonLocalUri, OneDevicePerProcess, SpecError
from mpqemu_mgmt.remote.polling import MAX_POLL_US

Machine = Literal["pc", "q35"]
Accel = Literal["kvm", "tcg"]
DriverName = Literal["direct", "libvirt"]
Backend = Literal["builtin", "qemu"]
Transport = Literal["mpqemu", "vfio-user"]
OnFailure = Literal["replug", "pause", "stop", "ignore"]

MACHINES: Final = ("pc", "q35")
ACCELS: Final = ("kvm", "tcg")
DRIVERS: Final = ("direct", "libvirt")
BACKENDS: Final = ("builtin", "qemu")
TRANSPORTS: Final = ("mpqemu", "vfio-user")
ON_FAILURE: Final = ("replug", "pause", "stop", "ignore")
#: The models ``python -m mpqemu_mgmt.remote`` serves (DESIGN.md Contracts 1).
BUILTIN_MODELS: Final = ("pci-testdev", "edu", "virtio-blk")
DEFAULT_QEMU_BINARY: Final = "qemu-system-x86_64"
DEFAULT_LIBVIRT_URI: Final = "qemu:///system"

# QEMU ids: a letter, then letters, digits, '-', '.', '_' (mirrors id_wellformed in util/id.c).
_QEMU_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,62}$")
# libvirt domain names may be almost anything; we also use the name in paths, so keep it tame.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)
_PROP_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
_UNIT_MIB: Final = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024, "": 1}

_TOP_KEYS: Final = frozenset(
    {"name", "memory", "machine", "accel", "driver", "uri", "qemu_binary", "vcpus", "boot", "device"}
)
_BOOT_KEYS: Final = frozenset({"kernel", "initrd", "cmdline"})
_DEVICE_KEYS: Final = frozenset(
    {"id", "model", "backend", "transport", "on_failure", "backing", "readonly", "props", "remote",
     "poll_us"}
)


@dataclass(frozen=True)
class BootSpec:
    """Direct kernel boot (``-kernel/-initrd/-append``; ``<os><kernel/>`` in libvirt)."""

    kernel: str
    initrd: str | None = None
    cmdline: str = ""


@dataclass(frozen=True)
class DeviceSpec:
    """One remote PCI device, served by its own process (one device per process)."""

    id: str
    model: str
    backend: Backend = "builtin"
    transport: Transport = "mpqemu"
    on_failure: OnFailure = "replug"
    backing: str | None = None
    readonly: bool = False
    props: tuple[tuple[str, str], ...] = ()
    #: The remote process this device lives in; defaults to its own (the id).
    remote: str = ""
    #: builtin remotes: their ``--poll-us`` (busy-poll window after a reply; 0 turns it off;
    #: None keeps the remote's default, remote/polling.py)
    poll_us: int | None = None

    @property
    def remote_name(self) -> str:
        return self.remote or self.id

    def to_dict(self) -> dict[str, Any]:
        """The ``[[device]]`` table this spec came from (defaults included)."""
        out: dict[str, Any] = {
            "id": self.id,
            "model": self.model,
            "backend": self.backend,
            "transport": self.transport,
            "on_failure": self.on_failure,
            "readonly": self.readonly,
        }
        if self.backing is not None:
            out["backing"] = self.backing
        if self.props:
            out["props"] = dict(self.props)
        if self.remote:
            out["remote"] = self.remote
        if self.poll_us is not None:
            out["poll_us"] = self.poll_us
        return out


@dataclass(frozen=True)
class GuestSpec:
    name: str
    memory_mib: int = 256
    machine: Machine = "pc"
    accel: Accel = "tcg"
    driver: DriverName = "direct"
    uri: str = DEFAULT_LIBVIRT_URI
    qemu_binary: str = DEFAULT_QEMU_BINARY
    vcpus: int = 1
    boot: BootSpec | None = None
    devices: tuple[DeviceSpec, ...] = ()
    #: Where the spec came from, for error messages; not part of the guest.
    source: str = field(default="<spec>", compare=False)

    def device(self, device_id: str) -> DeviceSpec:
        for dev in self.devices:
            if dev.id == device_id:
                return dev
        raise SpecError(f"{self.source}: no device {device_id!r}", file=self.source, key="device")

    def with_device(self, dev: DeviceSpec) -> GuestSpec:
        """A copy with ``dev`` appended; validated like a spec file would be."""
        new = replace(self, devices=(*self.devices, dev))
        check_devices(new.devices, new.source)
        return new

    def without_device(self, device_id: str) -> GuestSpec:
        self.device(device_id)
        return replace(self, devices=tuple(d for d in self.devices if d.id != device_id))

    def to_dict(self) -> dict[str, Any]:
        """The TOML tables of this spec (what :func:`spec_from_dict` reads back)."""
        out: dict[str, Any] = {
            "name": self.name,
            "memory": f"{self.memory_mib}M",
            "machine": self.machine,
            "accel": self.accel,
            "driver": self.driver,
            "qemu_binary": self.qemu_binary,
            "vcpus": self.vcpus,
        }
        if self.driver == "libvirt":
            out["uri"] = self.uri
        if self.boot is not None:
            boot: dict[str, Any] = {"kernel": self.boot.kernel, "cmdline": self.boot.cmdline}
            if self.boot.initrd is not None:
                boot["initrd"] = self.boot.initrd
            out["boot"] = boot
        out["device"] = [d.to_dict() for d in self.devices]
        return out


def _err(file: str, key: str, what: str) -> SpecError:
    return SpecError(f"{file}: {key}: {what}", file=file, key=key, reason=what)


def _choice(table: Mapping[str, Any], key: str, where: str, choices: tuple[str, ...], default: str,
            *, file: str) -> str:
    value = table.get(key, default)
    if not isinstance(value, str) or value not in choices:
        raise _err(file, f"{where}{key}", f"must be one of {', '.join(choices)} (got {value!r})")
    return value


def _string(table: Mapping[str, Any], key: str, where: str, file: str, *, required: bool = False,
            default: str | None = None) -> str | None:
    if key not in table:
        if required:
            raise _err(file, f"{where}{key}", "is required")
        return default
    value = table[key]
    if not isinstance(value, str) or not value:
        raise _err(file, f"{where}{key}", f"must be a non-empty string (got {value!r})")
    return value


def parse_memory(value: object, file: str = "<spec>", key: str = "memory") -> int:
    """``"256M"``, ``"1G"``, ``512`` (MiB) → MiB."""
    if isinstance(value, bool):
        raise _err(file, key, f"must be a size such as '256M' (got {value!r})")
    if isinstance(value, int):
        mib = value
    elif isinstance(value, str) and (m := _SIZE.match(value)):
        mib_f = int(m.group(1)) * _UNIT_MIB[m.group(2).upper()]
        if mib_f != int(mib_f):
            raise _err(file, key, f"must be a whole number of MiB (got {value!r})")
        mib = int(mib_f)
    else:
        raise _err(file, key, f"must be a size such as '256M' (got {value!r})")
    if not 16 <= mib <= 1024 * 1024:
        raise _err(file, key, f"must be between 16M and 1T (got {value!r})")
    return mib


def _unknown(table: Mapping[str, Any], allowed: frozenset[str], where: str, file: str) -> None:
    for key in table:
        if key not in allowed:
            raise _err(file, f"{where}{key}", f"unknown key (allowed: {', '.join(sorted(allowed))})")


def device_from_dict(table: Mapping[str, Any], file: str = "<spec>", where: str = "") -> DeviceSpec:
    """One ``[[device]]`` table (also the ``KEY=VALUE`` pairs of ``mpqemu-mgmt attach``)."""
    _unknown(table, _DEVICE_KEYS, where, file)
    dev_id = _string(table, "id", where, file, required=True)
    assert dev_id is not None
    if not _QEMU_ID.match(dev_id):
        raise _err(file, f"{where}id", f"{dev_id!r} is not a QEMU id (a letter, then letters, digits, -._)")
    model = _string(table, "model", where, file, required=True)
    assert model is not None
    backend = _choice(table, "backend", where, BACKENDS, "builtin", file=file)
    transport = _choice(table, "transport", where, TRANSPORTS, "mpqemu", file=file)
    on_failure = _choice(table, "on_failure", where, ON_FAILURE, "replug", file=file)
    if backend == "builtin" and model not in BUILTIN_MODELS:
        raise _err(file, f"{where}model",
                   f"{model!r} is not a builtin model ({', '.join(BUILTIN_MODELS)}); "
                   "use backend = \"qemu\" for a QEMU device")
    if backend == "qemu" and not _QEMU_ID.match(model):
        raise _err(file, f"{where}model", f"{model!r} is not a QEMU device name")
    if backend == "qemu" and transport != "mpqemu":
        # Stock x-remote speaks vfio-user only through a vfio-user server object, which QEMU 7.2
        # does not build (hw/remote/vfio-user-obj.c needs CONFIG_VFIO_USER_SERVER).
        raise _err(file, f"{where}transport", "backend \"qemu\" serves only the mpqemu transport")
    backing = _string(table, "backing", where, file)
    readonly = table.get("readonly", False)
    if not isinstance(readonly, bool):
        raise _err(file, f"{where}readonly", f"must be true or false (got {readonly!r})")
    raw_props = table.get("props", {})
    if not isinstance(raw_props, Mapping):
        raise _err(file, f"{where}props", "must be a table of device properties")
    props: list[tuple[str, str]] = []
    for pkey, pval in raw_props.items():
        if not isinstance(pkey, str) or not _PROP_KEY.match(pkey) or pkey in ("id", "driver", "bus", "addr"):
            raise _err(file, f"{where}props.{pkey}", "is not a settable device property")
        if isinstance(pval, bool):
            sval = "on" if pval else "off"
        elif isinstance(pval, int | str):
            sval = str(pval)
        else:
            raise _err(file, f"{where}props.{pkey}", f"must be a string, integer or boolean (got {pval!r})")
        if "," in sval or "=" in sval:
            # Would smuggle extra options into a -device string.
            raise _err(file, f"{where}props.{pkey}", f"must not contain ',' or '=' (got {sval!r})")
        props.append((pkey, sval))
    remote = _string(table, "remote", where, file, default="") or ""
    poll_us = table.get("poll_us")
    if poll_us is not None:
        if isinstance(poll_us, bool) or not isinstance(poll_us, int) or not 0 <= poll_us <= MAX_POLL_US:
            raise _err(file, f"{where}poll_us",
                       f"must be an integer from 0 to {MAX_POLL_US} (got {poll_us!r})")
        if backend != "builtin":
            raise _err(file, f"{where}poll_us",
                       "applies to builtin remotes only (QEMU's x-remote has no such option)")
    return DeviceSpec(
        id=dev_id,
        model=model,
        backend=cast(Backend, backend),
        transport=cast(Transport, transport),
        on_failure=cast(OnFailure, on_failure),
        backing=backing,
        readonly=readonly,
        props=tuple(props),
        remote=remote,
        poll_us=poll_us,
    )


def check_devices(devices: tuple[DeviceSpec, ...], file: str) -> None:
    """Cross-device rules: unique ids, and one device per remote process."""
    seen: dict[str, int] = {}
    remotes: dict[str, str] = {}
    for index, dev in enumerate(devices):
        if dev.id in seen:
            raise _err(file, f"device[{index}].id", f"duplicate id {dev.id!r} (also device[{seen[dev.id]}])")
        seen[dev.id] = index
        other = remotes.get(dev.remote_name)
        if other is not None:
            # hw/remote/remote-obj.c: x-remote-object sets max_devs = 1 so one VM's device
            # cannot reach another's RAM; we refuse before anything starts.
            raise OneDevicePerProcess(
                f"{file}: device[{index}]: {dev.id!r} and {other!r} both name remote process "
                f"{dev.remote_name!r}; a remote serves exactly one device",
                file=file, key=f"device[{index}].remote", device=dev.id,
            )
        remotes[dev.remote_name] = dev.id


def is_local_uri(uri: str) -> bool:
    """True for libvirt URIs that reach the daemon over a local UNIX socket."""
    parts = urlsplit(uri)
    transport = parts.scheme.partition("+")[2]
    return (transport in ("", "unix")) and not parts.hostname


def check_fd_passing(spec: GuestSpec) -> None:
    """Refuse fd-passing work (every device plug) on a non-local libvirt URI."""
    if spec.driver == "libvirt" and spec.devices and not is_local_uri(spec.uri):
        raise NonLocalUri(
            f"{spec.source}: uri {spec.uri!r} is not local; handing a socket to QEMU needs "
            "virDomainQemuMonitorCommandWithFiles over a local UNIX socket",
            file=spec.source, key="uri", uri=spec.uri,
        )


def spec_from_dict(data: Mapping[str, Any], file: str = "<spec>") -> GuestSpec:
    """Validate the tables of one guest spec."""
    _unknown(data, _TOP_KEYS, "", file)
    name = _string(data, "name", "", file, required=True)
    assert name is not None
    if not _NAME.match(name):
        raise _err(file, "name", f"{name!r} must be letters, digits, '-', '.', '_' (at most 64)")
    memory = parse_memory(data.get("memory", "256M"), file)
    machine = _choice(data, "machine", "", MACHINES, "pc", file=file)
    accel = _choice(data, "accel", "", ACCELS, "tcg", file=file)
    driver = _choice(data, "driver", "", DRIVERS, "direct", file=file)
    uri = _string(data, "uri", "", file, default=DEFAULT_LIBVIRT_URI) or DEFAULT_LIBVIRT_URI
    if "uri" in data and driver != "libvirt":
        raise _err(file, "uri", "only meaningful with driver = \"libvirt\"")
    if driver == "libvirt" and not uri.startswith("qemu"):
        raise _err(file, "uri", f"must be a qemu:// libvirt URI (got {uri!r})")
    qemu_binary = _string(data, "qemu_binary", "", file, default=DEFAULT_QEMU_BINARY) or DEFAULT_QEMU_BINARY
    vcpus = data.get("vcpus", 1)
    if not isinstance(vcpus, int) or isinstance(vcpus, bool) or not 1 <= vcpus <= 64:
        raise _err(file, "vcpus", f"must be an integer 1..64 (got {vcpus!r})")
    boot: BootSpec | None = None
    if "boot" in data:
        raw_boot = data["boot"]
        if not isinstance(raw_boot, Mapping):
            raise _err(file, "boot", "must be a table")
        _unknown(raw_boot, _BOOT_KEYS, "boot.", file)
        kernel = _string(raw_boot, "kernel", "boot.", file, required=True)
        assert kernel is not None
        initrd = _string(raw_boot, "initrd", "boot.", file)
        cmdline = raw_boot.get("cmdline", "")
        if not isinstance(cmdline, str):
            raise _err(file, "boot.cmdline", "must be a string")
        boot = BootSpec(kernel=kernel, initrd=initrd, cmdline=cmdline)
    raw_devices = data.get("device", [])
    if not isinstance(raw_devices, list):
        raise _err(file, "device", "must be an array of tables ([[device]])")
    devices: list[DeviceSpec] = []
    for index, raw in enumerate(raw_devices):
        if not isinstance(raw, Mapping):
            raise _err(file, f"device[{index}]", "must be a table")
        devices.append(device_from_dict(raw, file, f"device[{index}]."))
    check_devices(tuple(devices), file)
    spec = GuestSpec(
        name=name,
        memory_mib=memory,
        machine=cast(Machine, machine),
        accel=cast(Accel, accel),
        driver=cast(DriverName, driver),
        uri=uri,
        qemu_binary=qemu_binary,
        vcpus=vcpus,
        boot=boot,
        devices=tuple(devices),
        source=file,
    )
    check_fd_passing(spec)
    return spec


def parse_spec(text: str, file: str = "<spec>") -> GuestSpec:
    """Parse TOML text; syntax errors name the file and the line."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{file}: not valid TOML: {exc}", file=file, key="", reason=str(exc)) from exc
    return spec_from_dict(data, file)


def load_spec(path: str | Path) -> GuestSpec:
    """Read and parse a spec file (the only IO in this module)."""
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"{file}: cannot read: {exc.strerror}", file=file, key="", reason=str(exc)) from exc
    return parse_spec(text, file)


def device_from_pairs(pairs: list[str], file: str = "<command line>") -> DeviceSpec:
    """``id=t1 model=pci-testdev backend=builtin props.vectors=0`` (``mpqemu-mgmt attach``)."""
    table: dict[str, Any] = {}
    props: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise _err(file, pair, "expected KEY=VALUE")
        if key.startswith("props."):
            props[key[len("props."):]] = value
        elif key == "readonly":
            if value not in ("true", "false"):
                raise _err(file, key, f"must be true or false (got {value!r})")
            table[key] = value == "true"
        elif key == "poll_us":
            if not value.isdigit():
                raise _err(file, key, f"must be an integer from 0 to {MAX_POLL_US} (got {value!r})")
            table[key] = int(value)
        else:
            table[key] = value
    if props:
        table["props"] = props
    return device_from_dict(table, file)
