"""PCI register offsets and bit constants for a conventional (256-byte, type 0) config space.

Pure data: names and numbers only, as in QEMU's ``include/standard-headers/linux/pci_regs.h``.
This module must not contain logic or import anything outside the standard library.
"""

from __future__ import annotations

from typing import Final

CONFIG_SPACE_SIZE: Final = 256
HEADER_SIZE: Final = 0x40  # PCI_CONFIG_HEADER_SIZE; device-specific space follows

# Type-0 header offsets
VENDOR_ID: Final = 0x00
DEVICE_ID: Final = 0x02
COMMAND: Final = 0x04
STATUS: Final = 0x06
REVISION_ID: Final = 0x08
CLASS_PROG: Final = 0x09
CLASS_DEVICE: Final = 0x0A
CACHE_LINE_SIZE: Final = 0x0C
LATENCY_TIMER: Final = 0x0D
HEADER_TYPE: Final = 0x0E
BIST: Final = 0x0F
BASE_ADDRESS_0: Final = 0x10
CARDBUS_CIS: Final = 0x28
SUBSYSTEM_VENDOR_ID: Final = 0x2C
SUBSYSTEM_ID: Final = 0x2E
ROM_ADDRESS: Final = 0x30
CAPABILITY_LIST: Final = 0x34
INTERRUPT_LINE: Final = 0x3C
INTERRUPT_PIN: Final = 0x3D
MIN_GNT: Final = 0x3E
MAX_LAT: Final = 0x3F

NUM_BARS: Final = 6  # type 0: BAR0..BAR5 at 0x10..0x24


def bar_offset(index: int) -> int:
    """Config offset of BAR ``index`` (0..5)."""
    return BASE_ADDRESS_0 + 4 * index


# Command register bits
COMMAND_IO: Final = 0x0001
COMMAND_MEMORY: Final = 0x0002
COMMAND_MASTER: Final = 0x0004
COMMAND_SPECIAL: Final = 0x0008
COMMAND_INVALIDATE: Final = 0x0010
COMMAND_VGA_PALETTE: Final = 0x0020
COMMAND_PARITY: Final = 0x0040
COMMAND_WAIT: Final = 0x0080
COMMAND_SERR: Final = 0x0100
COMMAND_FAST_BACK: Final = 0x0200
COMMAND_INTX_DISABLE: Final = 0x0400

# Status register bits
STATUS_INTERRUPT: Final = 0x0008
STATUS_CAP_LIST: Final = 0x0010
STATUS_66MHZ: Final = 0x0020
STATUS_FAST_BACK: Final = 0x0080
STATUS_PARITY: Final = 0x0100
STATUS_DEVSEL_MEDIUM: Final = 0x0200
STATUS_SIG_TARGET_ABORT: Final = 0x0800
STATUS_REC_TARGET_ABORT: Final = 0x1000
STATUS_REC_MASTER_ABORT: Final = 0x2000
STATUS_SIG_SYSTEM_ERROR: Final = 0x4000
STATUS_DETECTED_PARITY: Final = 0x8000

# BAR low bits
BASE_ADDRESS_SPACE_IO: Final = 0x01
BASE_ADDRESS_MEM_TYPE_64: Final = 0x04
BASE_ADDRESS_MEM_PREFETCH: Final = 0x08
BASE_ADDRESS_IO_MASK: Final = ~0x03
BASE_ADDRESS_MEM_MASK: Final = ~0x0F

HEADER_TYPE_NORMAL: Final = 0x00

# Capability IDs (the ones a device here might use)
CAP_ID_PM: Final = 0x01
CAP_ID_MSI: Final = 0x05
CAP_ID_VNDR: Final = 0x09
CAP_ID_EXP: Final = 0x10
CAP_ID_MSIX: Final = 0x11

# Class codes used by the in-tree models (base class 0x00 sub 0xff: "other", as QEMU's
# PCI_CLASS_OTHERS = 0x00ff)
CLASS_OTHERS: Final = 0x00FF
CLASS_STORAGE_SCSI: Final = 0x0100
CLASS_STORAGE_OTHER: Final = 0x0180

# QEMU's PCI core defaults (hw/pci/pci.c pci_config_set_* in do_pci_register_device /
# pci_init_* and include/hw/pci/pci.h): every device without its own subsystem IDs gets these.
QEMU_SUBSYSTEM_VENDOR_ID: Final = 0x1AF4  # PCI_SUBVENDOR_ID_REDHAT_QUMRANET
QEMU_SUBSYSTEM_ID: Final = 0x1100  # PCI_SUBDEVICE_ID_QEMU
