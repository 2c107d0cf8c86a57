"""The one exception tree of mpqemu-mgmt, and the CLI exit code each branch maps to.

Every error raised on purpose by this package derives from :class:`MpqemuError`. Boundaries
translate foreign exceptions with ``raise ... from exc``; cancellation (``asyncio.CancelledError``,
``KeyboardInterrupt``) is never wrapped (python-qemu-qmp ``error.py`` does the same).

::

    MpqemuError                         exit 1  operation failed
    ├── UsageError                      exit 2  bad input or usage
    │   ├── SpecError                           a guest spec (TOML) is invalid: file, key, reason
    │   └── PolicyError                         a seccomp policy file is invalid: file, line, reason
    ├── RefusedError                    exit 3  refused by a precondition, nothing changed
    │   ├── MigrationRefused                    migration/save/snapshot of a guest with proxy devices
    │   ├── OneDevicePerProcess                 a second device into one remote process
    │   └── NonLocalUri                         fd passing over a non-local libvirt URI
    ├── NotFoundError                   exit 1  no such guest / device
    ├── ProtocolError                   exit 1  malformed or out-of-sequence mpqemu/vfio-user traffic
    │   ├── InvalidMessage                      fails the validity rules (mpqemu_msg_valid)
    │   ├── TruncatedMessage                    EOF or short read inside a message
    │   └── TooManyFds                          ancillary data truncated / over the fd limit
    ├── DeviceError                     exit 1  a device model refused an access (bad BAR, DMA range)
    │   ├── DmaError                            DMA outside guest RAM or not permitted
    │   └── VirtqueueError                      a guest broke the virtio ring contract (NEEDS_RESET)
    ├── ConfinementError                exit 4  a confinement layer could not be applied
    │   └── SeccompViolation                    a remote was killed by its seccomp filter
    ├── ProcessFailed                   exit 4  a remote or main QEMU process died or hung
    │   └── HeartbeatTimeout                    a process did not answer query-status in time
    ├── OrchestrationError              exit 1  a plan step failed (after rollback)
    │   └── StepTimeout                         a step (QMP command, event wait) timed out
    ├── LibvirtError                    exit 1  libvirtd refused or failed a call
    ├── GuestKitError                   exit 1  test-guest kit: no kernel, initramfs or QEMU root
    └── ServiceError                    exit 1  the management service is unreachable or refused
"""

from __future__ import annotations

from typing import Any


class MpqemuError(Exception):
    """Root of every error this package raises on purpose."""

    exit_code: int = 1

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form for ``--format json`` and the control API."""
        return {"error": type(self).__name__, "message": self.message, **self.details}


class UsageError(MpqemuError):
    exit_code = 2


class SpecError(UsageError):
    """A guest spec is invalid; ``details`` name ``file`` and ``key``."""


class PolicyError(UsageError):
    """A seccomp policy file is invalid; ``details`` name ``file`` and ``line``."""


class RefusedError(MpqemuError):
    exit_code = 3


class MigrationRefused(RefusedError):
    pass


class OneDevicePerProcess(RefusedError):
    pass


class NonLocalUri(RefusedError):
    pass


class NotFoundError(MpqemuError):
    pass


class ProtocolError(MpqemuError):
    pass


class InvalidMessage(ProtocolError):
    pass


class TruncatedMessage(ProtocolError):
    pass


class TooManyFds(ProtocolError):
    pass


class DeviceError(MpqemuError):
    pass


class DmaError(DeviceError):
    pass


class VirtqueueError(DeviceError):
    """A guest broke the virtio ring contract; the device stops and sets NEEDS_RESET."""


class ConfinementError(MpqemuError):
    exit_code = 4


class SeccompViolation(ConfinementError):
    pass


class ProcessFailed(MpqemuError):
    exit_code = 4


class HeartbeatTimeout(ProcessFailed):
    pass


class OrchestrationError(MpqemuError):
    pass


class StepTimeout(OrchestrationError):
    pass


class LibvirtError(MpqemuError):
    pass


class ServiceError(MpqemuError):
    pass


class GuestKitError(MpqemuError):
    """The test-guest kit (mpqemu_mgmt.guestkit) could not fetch or build one of its parts."""


EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_PROCESS = 4
EXIT_INTERRUPTED = 130
