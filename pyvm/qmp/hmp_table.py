"""The human monitor's command tables: top-level commands and ``info`` subcommands.

Commands are declared as QEMU declares them (hmp-commands.hx): a name with aliases
(``"cont|c"``), an ``args_type`` string, the ``params`` and ``help`` texts shown by
``help``, and a handler ``handler(ctx, args)`` (``ctx`` a :class:`pyvm.qmp.hmp.HmpContext`)
that prints through ``ctx.print``.  Parsing and execution: :mod:`pyvm.qmp.hmp`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable

from pyvm.qmp.errors import SchemaError

#: ``handler(ctx, args)``; ``ctx`` is a :class:`pyvm.qmp.hmp.HmpContext` (a layer above).
HmpHandler = Callable[[Any, dict[str, Any]], None]


@dataclass(frozen=True)
class HmpCommand:
    name: str                   # "cont|c": the name and its aliases
    args_type: str
    params: str
    help: str
    handler: HmpHandler

    def matches(self, word: str) -> bool:
        return word in self.name.split("|")


class HmpTable:
    """Top-level commands and ``info`` subcommands."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._commands: list[HmpCommand] = []
        self._info: list[HmpCommand] = []

    def _add(self, bucket: list[HmpCommand], cmd: HmpCommand) -> HmpCommand:
        with self._lock:
            for alias in cmd.name.split("|"):
                if any(other.matches(alias) for other in bucket):
                    raise SchemaError(f"HMP command '{alias}' is registered twice")
            bucket.append(cmd)
            bucket.sort(key=lambda c: c.name)      # QEMU sorts its tables (sortcmdlist)
        return cmd

    def register(self, name: str, args_type: str, params: str, help: str,
                 handler: HmpHandler) -> HmpCommand:
        return self._add(self._commands, HmpCommand(name, args_type, params, help, handler))

    def register_info(self, name: str, args_type: str, params: str, help: str,
                      handler: HmpHandler) -> HmpCommand:
        return self._add(self._info, HmpCommand(name, args_type, params, help, handler))

    def commands(self) -> list[HmpCommand]:
        with self._lock:
            return list(self._commands)

    def info_commands(self) -> list[HmpCommand]:
        with self._lock:
            return list(self._info)

    @staticmethod
    def find(cmds: list[HmpCommand], word: str) -> HmpCommand | None:
        return next((c for c in cmds if c.matches(word)), None)
