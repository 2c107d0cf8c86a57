"""Pure PCI device models, one module each, registered by name in :mod:`.catalogue`.

The model API is transport-neutral: the mpqemu serve loop (mpqemu_mgmt/remote/serve.py) and the
vfio-user one host the same models. Summary (details in :mod:`.base` and :mod:`.function`):

* a model is a :class:`~.base.PciDeviceModel`, built as ``Model(host)`` from one
  :class:`~.base.DeviceHost` (guest memory, INTx wire, timers, backing file, guest-error sink);
  ``catalogue.create(name, host)`` does that by name and imports only that model's module;
* ``model.config`` is its :class:`~mpqemu_mgmt.pci.config.ConfigSpace`;
  ``config_read(off, size)`` / ``config_write(off, size, value) -> ConfigEffects``;
* ``bar_read(bar, offset, size)`` / ``bar_write(bar, offset, size, value)`` take offsets inside a
  BAR: the host resolves absolute addresses with :class:`~mpqemu_mgmt.pci.barmap.BarMap`
  (mpqemu) or addresses regions by index (vfio-user, ``BarMap.check_region``);
* ``reset()`` is the device's own reset (QEMU's ``dc->reset``); ``status()`` feeds QMP
  ``x-device-status``;
* models raise the INTx level through ``self.intx`` (an :class:`~mpqemu_mgmt.pci.intx.IntxPin`,
  which applies Interrupt Disable and status bit 3), do DMA only through ``host.memory`` and
  defer work only through ``host.timers``; they never do IO, sleep or start threads.

Models: :mod:`.pci_testdev` (``pci-testdev``), :mod:`.edu` (``edu``), :mod:`.virtio_blk`
(``virtio-blk``, with the :mod:`.virtio` core).
"""
