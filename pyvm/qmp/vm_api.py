"""What the monitor needs from the VM: the interface ``pyvm.machine.Machine`` provides.

The monitor is written against this Protocol only; tests use an in-process fake.
Methods may be called from the monitor's command thread while the guest runs.
"""

from __future__ import annotations

from typing import Any, Protocol

from pyvm.events import EventBus
from pyvm.runstate import RunStateMachine


class VmApi(Protocol):
    runstate: RunStateMachine     # .state is a pyvm.runstate.RunState
    events: EventBus              # STOP, RESUME, SHUTDOWN, RESET, POWERDOWN (+ migration's)
    name: str | None              # -name
    uuid: str                     # "00000000-0000-0000-0000-000000000000" unless -uuid

    def stop(self) -> None:
        """Pause the vCPUs: running -> paused (emits STOP); a no-op otherwise."""

    def cont(self) -> None:
        """Start or resume (emits RESUME); raises pyvm.errors.VmStateError with QEMU's text."""

    def system_reset(self) -> None:
        """Reset; emits RESET {"guest": false, "reason": "host-qmp-system-reset"}."""

    def system_powerdown(self) -> None:
        """Emits POWERDOWN."""

    def quit(self) -> None:
        """Emits SHUTDOWN {"guest": false, "reason": "host-qmp-quit"}; the process exits soon."""

    def read_physical(self, addr: int, size: int) -> bytes:
        """Guest-physical bytes; raises ValueError outside guest RAM."""

    def read_virtual(self, cpu_index: int, addr: int, size: int) -> bytes:
        """Bytes at a virtual address through the CPU's page tables; ValueError if unmapped."""

    def cpus_info(self) -> list[dict[str, Any]]:
        """query-cpus-fast entries (cpu-index, qom-path, thread-id, target, props)."""

    def cpu_registers(self, cpu_index: int) -> dict[str, int]:
        """Register values by lower-case name: rax..r15, rip, rflags, es..gs, cr0..cr4, efer.

        Optional extras the human monitor prints when present: ``<seg>_base``,
        ``<seg>_limit``, ``<seg>_flags`` (QEMU's descriptor-cache flags) for es, cs, ss,
        ds, fs, gs, ldtr, tr; ``gdtr_base``, ``gdtr_limit``, ``idtr_base``, ``idtr_limit``;
        ``dr0``..``dr3``, ``dr6``, ``dr7``; ``fpcw``, ``fpsw``, ``fptw``, ``mxcsr``; ``halted``.
        """

    def memdevs(self) -> list[dict[str, Any]]:
        """query-memdev entries."""

    def chardevs(self) -> list[dict[str, Any]]:
        """query-chardev entries."""

    def mtree(self) -> str:
        """The ``info mtree`` text."""
