"""mpqemu-mgmt: the management layer for multi-process QEMU.

Device emulation moves out of the main QEMU into confined remote processes that speak QEMU 7.2's
private mpqemu protocol (or vfio-user). This package holds the remote emulator, its confinement,
the orchestration of QEMU and libvirt, and the supervising service with its CLI.
"""

__version__ = "0.1.0"
