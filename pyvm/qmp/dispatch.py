"""Request checking and command invocation (qapi/qmp-dispatch.c, monitor/qmp.c).

:func:`check_request` turns one parsed JSON value into either a ready :class:`Reply` or a
:class:`Call` to execute; :func:`run_call` executes a call and builds its reply.  Both
are free of I/O.  The checks run in QEMU's order with QEMU's texts:

1. not an object: ``QMP input must be a JSON object`` (no ``id`` in the reply);
2. the request's members, walked in QDict order: ``execute`` must be a string,
   ``arguments`` an object, ``id`` anything, anything else (``exec-oob`` too, since pyvm
   does not offer out-of-band execution) is unexpected; then ``execute`` must exist;
3. unknown command: CommandNotFound; before negotiation every command but
   ``qmp_capabilities`` is unknown, and the text becomes
   ``Expecting capabilities negotiation with 'qmp_capabilities'``;
4. the arguments, against the command's schema (:mod:`pyvm.qmp.visitor`).

Every reply to an object carries its ``id`` unchanged, whatever its JSON type.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

from pyvm.errors import VmStateError
from pyvm.qmp.context import CommandContext, MonitorState
from pyvm.qmp.errors import COMMAND_NOT_FOUND, CommandError
from pyvm.qmp.key_order import qdict_order
from pyvm.qmp.registry import Command, CommandTable
from pyvm.qmp.schema import EMPTY
from pyvm.qmp.visitor import conform, validate

log = logging.getLogger("pyvm.qmp")

_NEGOTIATION_COMMANDS = ("qmp_capabilities",)
NEGOTIATION_TEXT = "Expecting capabilities negotiation with 'qmp_capabilities'"
NO_ID: Any = object()        # marks a request without "id"
_NO_ID = NO_ID


@dataclass(frozen=True)
class Reply:
    """A response that needs no command execution."""

    msg: dict[str, Any]


@dataclass(frozen=True)
class Call:
    command: Command
    args: dict[str, Any]
    id: Any = _NO_ID


def error_msg(err: CommandError, req_id: Any = _NO_ID) -> dict[str, Any]:
    msg: dict[str, Any] = {"error": err.to_dict()}
    if req_id is not _NO_ID:
        msg["id"] = req_id
    return msg


def return_msg(value: Any, req_id: Any = _NO_ID) -> dict[str, Any]:
    msg: dict[str, Any] = {"return": value}
    if req_id is not _NO_ID:
        msg["id"] = req_id
    return msg


def _check_members(request: dict[str, Any]) -> str:
    """qmp_dispatch_check_obj without out-of-band support; returns the command name."""
    for key in qdict_order(request):
        value = request[key]
        if key == "execute":
            if not isinstance(value, str):
                raise CommandError("QMP input member 'execute' must be a string")
        elif key == "arguments":
            if not isinstance(value, dict):
                raise CommandError("QMP input member 'arguments' must be an object")
        elif key != "id":
            raise CommandError(f"QMP input member '{key}' is unexpected")
    name = request.get("execute")
    if name is None:
        raise CommandError("QMP input lacks member 'execute'")
    assert isinstance(name, str)
    return name


def check_request(request: Any, table: CommandTable, state: MonitorState) -> Reply | Call:
    if not isinstance(request, dict):
        return Reply(error_msg(CommandError("QMP input must be a JSON object")))
    req_id = request.get("id", _NO_ID)
    try:
        name = _check_members(request)
        cmd = None
        if state.negotiated or name in _NEGOTIATION_COMMANDS:
            cmd = table.lookup(name)
        if cmd is None:
            if not state.negotiated:
                raise CommandError(NEGOTIATION_TEXT, COMMAND_NOT_FOUND)
            raise CommandError(f"The command {name} has not been found", COMMAND_NOT_FOUND)
        args = validate(cmd.args if cmd.args is not None else EMPTY,
                        request.get("arguments", {}))
    except CommandError as err:
        return Reply(error_msg(err, req_id))
    return Call(cmd, args, req_id)


def invoke(cmd: Command, args: dict[str, Any], ctx: CommandContext) -> Any:
    """Validate ``args`` and run ``cmd``'s handler; errors propagate as CommandError."""
    checked = validate(cmd.args if cmd.args is not None else EMPTY, args)
    return _run_handler(cmd, checked, ctx)


def execute(ctx: CommandContext, name: str, args: dict[str, Any] | None = None) -> Any:
    """Run another command with full argument validation (used by the human monitor).

    Raises :class:`CommandError` as the command would reply.
    """
    cmd = ctx.table.lookup(name)
    if cmd is None:
        raise CommandError(f"The command {name} has not been found", COMMAND_NOT_FOUND)
    return invoke(cmd, args or {}, ctx)


def _run_handler(cmd: Command, args: dict[str, Any], ctx: CommandContext) -> Any:
    try:
        result = cmd.handler(ctx, args)
    except CommandError:
        raise
    except VmStateError as err:
        raise CommandError(str(err)) from err
    except Exception as err:  # noqa: BLE001 - a failing handler must not end the monitor
        log.exception("command %s failed", cmd.name)
        print(f"pyvm: monitor command {cmd.name} failed: {err!r}", file=sys.stderr)
        raise CommandError(f"internal error in {cmd.name}: {err}") from err
    if result is None:
        return {}
    if cmd.returns is not None:
        result = conform(cmd.returns, result)
    return result


def run_call(call: Call, ctx: CommandContext) -> dict[str, Any]:
    """Execute ``call`` and build its reply; never raises."""
    try:
        value = _run_handler(call.command, call.args, ctx)
    except CommandError as err:
        return error_msg(err, call.id)
    return return_msg(value, call.id)
