"""A small virtio core for the in-tree device models: legacy virtio-pci over INTx, split rings.

* :mod:`.constants` — wire numbers (status bits, feature bits, legacy register offsets, ring flags).
* :mod:`.vring` — the split-ring layout (field addresses, struct formats, event-index test,
  fence) shared with the test driver in ``mpqemu_mgmt.testing.virtio_driver``.
* :mod:`.ring` — one split virtqueue over :class:`~mpqemu_mgmt.devices.base.GuestMemory`:
  descriptor chains, indirect tables, avail/used rings, VIRTIO_RING_F_EVENT_IDX.
* :mod:`.legacy_pci` — the legacy (virtio 0.9.5) I/O BAR register file, feature negotiation,
  device status, queue PFN setup and the ISR over INTx.
* :mod:`.iov` — scatter-list arithmetic shared by the virtio-blk handler and :mod:`.blockio`.
* :mod:`.blockio` — the named IO shell of this package: the only module that touches a backing fd.

Everything except :mod:`.blockio` is pure: no file, socket or process IO, only the guest memory
and IRQ line objects the host passes in. The package must not import anything from
``mpqemu_mgmt.remote``; hosts import us, never the other way round.
"""
