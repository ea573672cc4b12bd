"""What a command handler gets besides its arguments.

:class:`MonitorState` is the per-connection negotiation state (``qmp_capabilities``);
:class:`CommandContext` carries the VM, the table, the connection state and a list of
actions to run once the reply has been written (``quit`` exits only after its
``{"return": {}}`` reached the client).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from pyvm.qmp.errors import COMMAND_NOT_FOUND, CommandError

if TYPE_CHECKING:
    from pyvm.qmp.registry import CommandTable
    from pyvm.qmp.vm_api import VmApi


@dataclass
class MonitorState:
    """Capability negotiation of one QMP connection (monitor/qmp-cmds-control.c)."""

    offered: tuple[str, ...] = ()
    negotiated: bool = False
    enabled: frozenset[str] = frozenset()


@dataclass
class CommandContext:
    vm: "VmApi"
    table: "CommandTable"
    monitor: MonitorState = field(default_factory=lambda: MonitorState(negotiated=True))
    service: Any = None                   # the MonitorService, when there is one
    cpu_index: int = 0                    # the monitor's current CPU (HMP "cpu")
    after_reply: list[Callable[[], None]] = field(default_factory=list)

    def call_after_reply(self, action: Callable[[], None]) -> None:
        """Run ``action`` on the command thread once the reply has been flushed."""
        self.after_reply.append(action)

    def execute(self, name: str, args: dict[str, Any] | None = None) -> Any:
        """Run another command with full argument validation (used by the human monitor).

        Raises :class:`CommandError` as the command would reply.
        """
        from pyvm.qmp.dispatch import invoke
        cmd = self.table.lookup(name)
        if cmd is None:
            raise CommandError(f"The command {name} has not been found", COMMAND_NOT_FOUND)
        return invoke(cmd, args or {}, self)
