"""VM events as QMP messages.

``pyvm.events.EventBus`` delivers :class:`pyvm.events.Event` objects on the emitting
thread; the server hands them to its event loop and sends
``{"event": NAME, "data": {...}, "timestamp": {"seconds": S, "microseconds": U}}`` to every
negotiated QMP connection.  Events without data have no ``data`` member.  Data members
are printed in the order the event's schema declares them.
"""

from __future__ import annotations

from typing import Any

from pyvm.events import Event
from pyvm.qmp.registry import CommandTable
from pyvm.qmp.visitor import conform


def event_message(event: Event, table: CommandTable | None = None) -> dict[str, Any]:
    seconds, micro = event.seconds_micro
    msg: dict[str, Any] = {"event": event.name,
                           "timestamp": {"seconds": seconds, "microseconds": micro}}
    if event.data is not None:
        data: Any = event.data
        declared = table.event(event.name) if table is not None else None
        if declared is not None and declared.data is not None:
            data = conform(declared.data, data)
        msg["data"] = data
    return msg
