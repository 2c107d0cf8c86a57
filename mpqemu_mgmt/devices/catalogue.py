"""The device catalogue: model name → model class, imported only when asked for.

Contracts 1 names the models (``pci-testdev``, ``edu``, ``virtio-blk``). Entries are
``"module:Class"`` strings so that a remote serving one model never imports the others (start-up
time and resident memory of a confined remote are budgets; see bench/emulator_*.py).

Pure: no IO beyond importing the one module asked for.
"""

from __future__ import annotations

import importlib

from mpqemu_mgmt.devices.base import DeviceHost, PciDeviceModel
from mpqemu_mgmt.errors import UsageError

_MODELS: dict[str, str] = {
    "pci-testdev": "mpqemu_mgmt.devices.pci_testdev:PciTestDev",
    "edu": "mpqemu_mgmt.devices.edu:Edu",
    "virtio-blk": "mpqemu_mgmt.devices.virtio_blk:VirtioBlk",
}


def register(name: str, target: str) -> None:
    """Add or replace a model (``target`` is ``"package.module:Class"``)."""
    if ":" not in target:
        raise UsageError(f"catalogue target {target!r} is not 'module:Class'")
    _MODELS[name] = target


def names() -> list[str]:
    return sorted(_MODELS)


def model_class(name: str) -> type[PciDeviceModel]:
    """Import and return the class for ``name``; UsageError for an unknown or missing model."""
    target = _MODELS.get(name)
    if target is None:
        raise UsageError(f"unknown device model {name!r}; known: {', '.join(names())}", model=name)
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise UsageError(f"device model {name!r} is not available: {exc}", model=name) from exc
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, PciDeviceModel)):
        raise UsageError(f"{target} is not a PciDeviceModel", model=name)
    return cls


def create(name: str, host: DeviceHost) -> PciDeviceModel:
    """Build model ``name`` for ``host`` (every model class takes exactly one DeviceHost)."""
    cls = model_class(name)
    return cls(host)  # type: ignore[call-arg]
