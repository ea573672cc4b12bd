"""Errors of the monitor package.

Every error the monitor raises on purpose derives from :class:`QmpError`, itself a
:class:`pyvm.errors.PyvmError`::

    PyvmError
     +-- QmpError              root of pyvm.qmp
          +-- CommandError     a command failed; becomes {"error": {"class", "desc"}}
          |    +-- ArgumentError   the arguments do not match the command's schema
          +-- SchemaError      a schema or command table was declared inconsistently
          +-- HmpError         a human-monitor command line could not be parsed

Malformed JSON is not an exception: the sans-IO streamer reports it as a
:class:`pyvm.qmp.json_stream.ParseError` item, because it is an ordinary reply.
Causes are chained with ``raise X(...) from err``.
"""

from __future__ import annotations

from pyvm.errors import PyvmError

# QMP error classes (qapi/error.json, QapiErrorClass).
GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"
DEVICE_NOT_ACTIVE = "DeviceNotActive"
DEVICE_NOT_FOUND = "DeviceNotFound"
KVM_MISSING_CAP = "KVMMissingCap"

ERROR_CLASSES = (GENERIC_ERROR, COMMAND_NOT_FOUND, DEVICE_NOT_ACTIVE, DEVICE_NOT_FOUND,
                 KVM_MISSING_CAP)


class QmpError(PyvmError):
    """Root of the monitor's errors."""


class CommandError(QmpError):
    """A command failed; ``desc`` and ``error_class`` go to the client verbatim."""

    def __init__(self, desc: str, error_class: str = GENERIC_ERROR) -> None:
        super().__init__(desc)
        if error_class not in ERROR_CLASSES:
            raise ValueError(f"unknown QMP error class {error_class!r}")
        self.desc = desc
        self.error_class = error_class

    def to_dict(self) -> dict[str, str]:
        return {"class": self.error_class, "desc": self.desc}


class ArgumentError(CommandError):
    """Arguments rejected by the schema (the input visitor's texts; always GenericError)."""

    def __init__(self, desc: str) -> None:
        super().__init__(desc, GENERIC_ERROR)


class SchemaError(QmpError):
    """A type, command or event was declared inconsistently (a programming error)."""


class HmpError(QmpError):
    """A human-monitor command line is malformed; the message is printed as is."""
