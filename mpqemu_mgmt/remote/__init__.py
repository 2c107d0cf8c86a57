"""The remote device process: one device model served to a stock QEMU proxy, confined.

``python -m mpqemu_mgmt.remote`` (:mod:`.__main__`, Contracts 1) parses its arguments, wraps the
inherited fds, builds the model and everything the loop needs, calls ``lock_down`` (seccomp last),
then serves. The IO shell is split one job per module:

* :mod:`.transport` — the only recvmsg/sendmsg on the mpqemu socket (protocol engineer);
* :mod:`.dispatch` — a decoded mpqemu request → model calls → the RET (mirrors hw/remote/message.c);
* :mod:`.serve` — the single-threaded poll loop (socket, resamplefd, timers, QMP);
* :mod:`.memory` — guest RAM from SYNC_SYSMEM fds, mapped and bounds-checked for DMA;
* :mod:`.irq` — INTx over the SET_IRQFD irqfd/resamplefd pair (mirrors hw/remote/iohub.c);
* :mod:`.timers` — the one-shot timers models ask for (edu's DMA and factorial);
* :mod:`.qmp_server` — the remote's own QMP monitor for the service's heartbeat;
* ``vfio_user_*`` — the vfio-user transport and its serve loop over the same models.

Nothing here is imported by the management service: it runs in its own confined process.
"""
