"""The command table: every QMP command and event, declared once with its schema.

A :class:`CommandTable` maps names to :class:`Command` (argument type, result type,
handler, options) and lists events.  Dispatch, ``query-commands`` and
``query-qmp-schema`` all read the same table.  There is no process-wide table: whoever
builds a monitor builds its tables (:func:`pyvm.qmp.core.build_tables`) and other parts
of pyvm add their commands to them explicitly::

    def install(tables: MonitorTables) -> None:
        tables.qmp.register("migrate", MIGRATE_ARGS, None, qmp_migrate)
        tables.qmp.register_event("MIGRATION", {"status": MIGRATION_STATUS})

A handler is ``handler(ctx, args) -> result``: ``args`` holds the validated arguments
(absent optional members are absent), the result is checked against nothing but printed
in schema member order; ``None`` means ``{}``.  It raises
:class:`~pyvm.qmp.errors.CommandError` for a QMP error (or ``pyvm.errors.VmStateError``,
which becomes a GenericError).  Handlers run on the monitor's command thread unless
registered ``inline=True`` (only for quick, non-blocking queries: they run on the monitor
event loop).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from pyvm.qmp.errors import SchemaError
from pyvm.qmp.schema import ObjectType, QType, Struct, TypeRef, resolve

#: ``handler(ctx, args)``; ``ctx`` is a :class:`pyvm.qmp.context.CommandContext` (a layer
#: above this table, hence not named in the type).
Handler = Callable[[Any, dict[str, Any]], Any]
ArgsDecl = Optional[ObjectType | Mapping[str, TypeRef]]


@dataclass(frozen=True)
class Command:
    name: str
    args: ObjectType | None
    returns: QType | None
    handler: Handler
    allow_preconfig: bool = False
    allow_oob: bool = False
    inline: bool = False


@dataclass(frozen=True)
class EventDef:
    name: str
    data: ObjectType | None


def _args_type(owner: str, decl: ArgsDecl) -> ObjectType | None:
    if decl is None or isinstance(decl, ObjectType):
        return decl
    return Struct(f"q_obj_{owner}-arg", decl)


class CommandTable:
    """Commands and events in registration order (the order ``query-commands`` lists)."""

    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}
        self._events: dict[str, EventDef] = {}
        self._lock = threading.Lock()
        #: ``query-qmp-schema``'s result (:mod:`pyvm.qmp.introspect`), reset on every change
        self.schema_cache: list[dict[str, Any]] | None = None

    def register(self, name: str, args: ArgsDecl, returns: TypeRef | None, handler: Handler,
                 *, allow_preconfig: bool = False, allow_oob: bool = False,
                 inline: bool = False) -> Command:
        """Add a command; ``args`` is an object type or a QAPI-style member dict."""
        if allow_oob:
            raise SchemaError("pyvm does not implement out-of-band execution")
        cmd = Command(name, _args_type(name, args),
                      resolve(returns) if returns is not None else None, handler,
                      allow_preconfig, allow_oob, inline)
        with self._lock:
            if name in self._commands:
                raise SchemaError(f"command '{name}' is registered twice")
            self._commands[name] = cmd
            self.schema_cache = None
        return cmd

    def register_event(self, name: str, data: ArgsDecl = None) -> EventDef:
        ev = EventDef(name, _args_type(name, data))
        with self._lock:
            if name in self._events:
                raise SchemaError(f"event '{name}' is registered twice")
            self._events[name] = ev
            self.schema_cache = None
        return ev

    def lookup(self, name: str) -> Command | None:
        return self._commands.get(name)

    def event(self, name: str) -> EventDef | None:
        return self._events.get(name)

    def commands(self) -> list[Command]:
        with self._lock:
            return list(self._commands.values())

    def events(self) -> list[EventDef]:
        with self._lock:
            return list(self._events.values())
