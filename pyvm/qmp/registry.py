"""The command table: every QMP command and event, declared once with its schema.

A :class:`CommandTable` maps names to :class:`Command` (argument type, result type,
handler, options) and lists events.  Dispatch, ``query-commands`` and
``query-qmp-schema`` all read the same table.  Other parts of pyvm add commands with
:meth:`CommandTable.register` on a table, or for the process-wide default table with
:func:`register` / :func:`add_installer`::

    from pyvm.qmp.registry import add_installer

    def install(table):
        table.register("migrate", MIGRATE_ARGS, None, qmp_migrate)
        table.register_event("MIGRATION", {"status": MIGRATION_STATUS})

    add_installer(install)

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
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

from pyvm.qmp.errors import SchemaError
from pyvm.qmp.schema import ObjectType, QType, Struct, TypeRef, resolve

if TYPE_CHECKING:
    from pyvm.qmp.context import CommandContext

Handler = Callable[["CommandContext", dict[str, Any]], Any]
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
        self._schema_cache: list[dict[str, Any]] | None = None

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
            self._schema_cache = None
        return cmd

    def register_event(self, name: str, data: ArgsDecl = None) -> EventDef:
        ev = EventDef(name, _args_type(name, data))
        with self._lock:
            if name in self._events:
                raise SchemaError(f"event '{name}' is registered twice")
            self._events[name] = ev
            self._schema_cache = None
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

    def schema_info(self) -> list[dict[str, Any]]:
        """``query-qmp-schema``'s result, cached until the table changes."""
        cached = self._schema_cache
        if cached is None:
            from pyvm.qmp.introspect import schema_info
            cached = self._schema_cache = schema_info(self)
        return cached


Installer = Callable[[CommandTable], None]
_installers: list[Installer] = []
_default: CommandTable | None = None
_default_lock = threading.Lock()


def add_installer(install: Installer) -> None:
    """Have ``install(table)`` run on every table built by :func:`build_table`."""
    with _default_lock:
        _installers.append(install)
        table = _default
    if table is not None:
        install(table)


def build_table() -> CommandTable:
    """A new table with pyvm's core commands and events plus every added installer."""
    from pyvm.qmp.core import install_core
    table = CommandTable()
    install_core(table)
    with _default_lock:
        extra = list(_installers)
    for install in extra:
        install(table)
    return table


def default_table() -> CommandTable:
    """The process-wide table that monitors use unless given another."""
    global _default
    with _default_lock:
        if _default is not None:
            return _default
    table = build_table()
    with _default_lock:
        if _default is None:
            _default = table
        return _default


def register(name: str, args: ArgsDecl, returns: TypeRef | None, handler: Handler,
             **options: bool) -> Command:
    """Register a command in the default table."""
    return default_table().register(name, args, returns, handler, **options)
