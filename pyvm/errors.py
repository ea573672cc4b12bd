"""The error root of pyvm.

Every error pyvm raises on purpose derives from :class:`PyvmError`::

    PyvmError
     +-- ConfigError        bad command line or object options (one line, exit 1)
     +-- GuestError         the guest did something the VM cannot handle
     |    +-- GuestFault    unmapped access, triple fault, invalid opcode...
     +-- DeviceError        a device backend failed (disk I/O, chardev)
     +-- VmStateError       a request the current run state does not allow
     +-- CalibrationError   (pyvm.unicorn_internals) this Unicorn is not the calibrated one

Causes are chained with ``raise X(...) from err``.  The CLI prints ``str(err)`` for a
user error and never a traceback.
"""

from __future__ import annotations


class PyvmError(Exception):
    """Root of all pyvm errors."""


class ConfigError(PyvmError):
    """A command-line option or object property is invalid."""


class GuestError(PyvmError):
    """The guest put the machine in a state it cannot continue from."""


class GuestFault(GuestError):
    """A fault the VM cannot deliver to the guest (it carries a full report)."""

    def __init__(self, message: str, report: str = "") -> None:
        super().__init__(message)
        self.report = report


class DeviceError(PyvmError):
    """A device backend (disk image, character device) failed."""


class VmStateError(PyvmError):
    """A request that the VM's current run state does not allow (QEMU's text in the message)."""
