"""An in-process stand-in for pyvm.machine.Machine implementing pyvm.qmp.vm_api.VmApi.

Its "guest" is a thread that counts while the VM is running, so tests can check that
monitor traffic never stops it.  Guest RAM is a bytearray with a known pattern; virtual
addresses map to physical ones at an offset of VIRT_OFFSET.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from pyvm.errors import VmStateError
from pyvm.events import EventBus
from pyvm.runstate import RunState, RunStateMachine

VIRT_OFFSET = 0xFFFF_8000_0000_0000


class FakeVm:
    def __init__(self, state: RunState = RunState.RUNNING, ram_size: int = 1 << 20,
                 ncpus: int = 2, name: str | None = None,
                 uuid: str = "00000000-0000-0000-0000-000000000000") -> None:
        self.runstate = RunStateMachine(state)
        self.events = EventBus()
        self.name = name
        self.uuid = uuid
        pattern = bytes((i * 7 + 3) & 0xFF for i in range(256))      # period 256
        self.ram = bytearray(pattern * (ram_size // 256) + pattern[:ram_size % 256])
        self.ncpus = ncpus
        self.calls: list[str] = []
        self.quit_called = threading.Event()
        self.ticks = 0
        self._guest_stop = threading.Event()
        self._guest: threading.Thread | None = None
        self.runstate.add_listener(self._on_change)

    # -- the guest ------------------------------------------------------------------------------
    def start_guest(self) -> None:
        def run() -> None:
            while not self._guest_stop.is_set():
                if self.runstate.running:
                    self.ticks += 1
                time.sleep(0.0005)
        self._guest = threading.Thread(target=run, name="fake-guest", daemon=True)
        self._guest.start()

    def stop_guest(self) -> None:
        self._guest_stop.set()
        if self._guest is not None:
            self._guest.join()

    def _on_change(self, old: RunState, new: RunState) -> None:
        if new is RunState.RUNNING:
            self.events.emit("RESUME")
        elif old is RunState.RUNNING:
            self.events.emit("STOP")

    # -- VmApi ----------------------------------------------------------------------------------
    def stop(self) -> None:
        self.calls.append("stop")
        if self.runstate.running:
            self.runstate.set(RunState.PAUSED)

    def cont(self) -> None:
        self.calls.append("cont")
        state = self.runstate.state
        if state is RunState.INMIGRATE:
            raise VmStateError("Guest is waiting for an incoming migration")
        if state in (RunState.INTERNAL_ERROR, RunState.SHUTDOWN):
            raise VmStateError("Resetting the Virtual Machine is required")
        if state is not RunState.RUNNING:
            self.runstate.set(RunState.RUNNING)

    def system_reset(self) -> None:
        self.calls.append("system_reset")
        self.events.emit("RESET", {"guest": False, "reason": "host-qmp-system-reset"})

    def system_powerdown(self) -> None:
        self.calls.append("system_powerdown")
        self.events.emit("POWERDOWN")

    def quit(self) -> None:
        self.calls.append("quit")
        self.events.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        self.quit_called.set()

    def read_physical(self, addr: int, size: int) -> bytes:
        if addr < 0 or size < 0 or addr + size > len(self.ram):
            raise ValueError(f"0x{addr:x}+{size} is outside guest RAM")
        return bytes(self.ram[addr:addr + size])

    def read_virtual(self, cpu_index: int, addr: int, size: int) -> bytes:
        if not 0 <= cpu_index < self.ncpus:
            raise ValueError("no such CPU")
        return self.read_physical(addr - VIRT_OFFSET, size)

    def cpus_info(self) -> list[dict[str, Any]]:
        return [{"cpu-index": i, "qom-path": f"/machine/unattached/device[{i}]",
                 "thread-id": 4242 + i, "target": "x86_64",
                 "props": {"core-id": 0, "thread-id": 0, "socket-id": i}}
                for i in range(self.ncpus)]

    def cpu_registers(self, cpu_index: int) -> dict[str, int]:
        if not 0 <= cpu_index < self.ncpus:
            raise ValueError("no such CPU")
        regs = {name: 0x1000 * (i + 1) + cpu_index for i, name in enumerate(
            ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10",
             "r11", "r12", "r13", "r14", "r15"])}
        regs.update(rip=VIRT_OFFSET + 0x100, rflags=0x246, cs=0x10, ds=0x18, es=0x18,
                    ss=0x18, fs=0, gs=0, cr0=0x80000011, cr2=0, cr3=0x1000, cr4=0x20,
                    efer=0x500, cs_flags=0x00A09B00)
        return regs

    def memdevs(self) -> list[dict[str, Any]]:
        return [{"id": "ram0", "size": len(self.ram), "merge": True, "dump": True,
                 "prealloc": False, "share": False, "host-nodes": [], "policy": "default"}]

    def chardevs(self) -> list[dict[str, Any]]:
        return [{"label": "serial0", "filename": "stdio", "frontend-open": True}]

    def mtree(self) -> str:
        return ("address-space: memory\n"
                "  0000000000000000-ffffffffffffffff (prio 0, i/o): system\n"
                f"    0000000000000000-{len(self.ram) - 1:016x} (prio 0, ram): pc.ram\n")
