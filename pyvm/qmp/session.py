"""One QMP connection's protocol, without I/O.

Bytes go in through :meth:`QmpSession.feed` and come out as stream items (parsed values
or parse errors) in input order; :meth:`QmpSession.prepare` checks an item *when it is
its turn* -- after the previous requests ran, so ``qmp_capabilities`` followed by a
command in the same packet works -- and yields a ready :class:`~pyvm.qmp.dispatch.Reply`
or a :class:`~pyvm.qmp.dispatch.Call` to execute.  :meth:`QmpSession.encode` frames an
outgoing message (CRLF line).  The server drives sessions; tests can join one to a
client in memory.
"""

from __future__ import annotations

from typing import Any

from pyvm.qmp.commands_control import version_info
from pyvm.qmp.context import MonitorState
from pyvm.qmp.dispatch import Call, Reply, check_request, error_msg
from pyvm.qmp.errors import CommandError
from pyvm.qmp.json_stream import JsonLimits, JsonStreamer, Parsed, StreamItem
from pyvm.qmp.json_writer import encode_line
from pyvm.qmp.registry import CommandTable

# pyvm executes every command in order on the monitor; it does not offer "oob".
OFFERED_CAPABILITIES: tuple[str, ...] = ()


class QmpSession:
    def __init__(self, table: CommandTable, limits: JsonLimits | None = None,
                 pretty: bool = False) -> None:
        self.table = table
        self.pretty = pretty
        self.state = MonitorState(offered=OFFERED_CAPABILITIES)
        self._streamer = JsonStreamer(limits)

    def greeting(self) -> bytes:
        return self.encode({"QMP": {"version": version_info(),
                                    "capabilities": list(self.state.offered)}})

    def feed(self, data: bytes) -> list[StreamItem]:
        return self._streamer.feed(data)

    def prepare(self, item: StreamItem) -> Reply | Call:
        if isinstance(item, Parsed):
            return check_request(item.value, self.table, self.state)
        return Reply(error_msg(CommandError(item.desc)))

    def encode(self, msg: Any) -> bytes:
        return encode_line(msg, self.pretty)

    @property
    def receives_events(self) -> bool:
        """Events go only to negotiated connections (monitor/qmp.c)."""
        return self.state.negotiated
