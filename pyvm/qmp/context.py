"""What a command handler gets besides its arguments.

:class:`MonitorState` is the per-connection negotiation state (``qmp_capabilities``);
:class:`CommandContext` carries the VM, the table, the connection state and a list of
actions to run once the reply has been written (``quit`` exits only after its
``{"return": {}}`` reached the client).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from pyvm.qmp.hmp_table import HmpTable
from pyvm.qmp.registry import CommandTable
from pyvm.qmp.vm_api import VmApi


class MonitorHost(Protocol):
    """What a command may ask of the monitor service it runs under."""

    def monitor_chardevs(self) -> list[dict[str, Any]]:
        """``query-chardev`` entries for the monitors' own character devices."""


@dataclass
class MonitorState:
    """Capability negotiation of one QMP connection (monitor/qmp-cmds-control.c)."""

    offered: tuple[str, ...] = ()
    negotiated: bool = False
    enabled: frozenset[str] = frozenset()


@dataclass
class CommandContext:
    vm: VmApi
    table: CommandTable
    monitor: MonitorState = field(default_factory=lambda: MonitorState(negotiated=True))
    service: MonitorHost | None = None    # the MonitorService, when there is one
    cpu_index: int = 0                    # the monitor's current CPU (HMP "cpu")
    after_reply: list[Callable[[], None]] = field(default_factory=list)
    #: the human monitor's table built with ``table`` (``human-monitor-command``)
    hmp_table: HmpTable | None = None

    def call_after_reply(self, action: Callable[[], None]) -> None:
        """Run ``action`` on the command thread once the reply has been flushed."""
        self.after_reply.append(action)
