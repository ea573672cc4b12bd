"""pyvm's monitors: QMP (QEMU Machine Protocol, QEMU 8.2 level) and the human monitor.

Layers, each calling only downward::

    options.py      command-line monitor options -> MonitorSpec
    server.py       event loop thread: endpoints, connections, events, command thread
    session.py      one QMP connection's protocol, sans I/O
    hmp*.py         the human monitor: table, parser, commands, formatting
    dispatch.py     request checks and command invocation
    commands_*.py   command handlers; core.py installs them; schema_core.py their types
    registry.py     the command/event table other modules extend
    introspect.py   query-qmp-schema from the table
    visitor.py      argument validation with QEMU's texts
    schema.py       QAPI-like types as data
    json_*.py       sans-IO JSON codec with QEMU's lexer, parser, limits and writer

Errors: see :mod:`pyvm.qmp.errors` (root :class:`~pyvm.qmp.errors.QmpError`).
The VM is reached only through :class:`pyvm.qmp.vm_api.VmApi`.
"""

from pyvm.qmp.errors import ArgumentError, CommandError, QmpError

__all__ = ["ArgumentError", "CommandError", "QmpError"]
