"""The PC machine: RAM, vCPUs, devices and the run loop that drives them.

The run loop owns the vCPUs: it runs on one host thread and gives each runnable vCPU a
time slice in turn (round robin, deterministic).  A slice ends at the earliest device
deadline, at the slice length, or when something kicks the loop (an IRQ raised from
another thread, a monitor command).  Between slices the loop runs expired device timers,
delivers pending interrupts to vCPU 0 (the PIC's INTR output goes to the bootstrap
processor only), and executes work queued by other threads with :meth:`Machine.run_on_loop`
— the only way other threads touch vCPU state.  When every vCPU is halted the loop
sleeps until the next deadline or kick, so an idle guest costs no host CPU.

Unicorn's ``emu_start`` releases the GIL, so the monitor and migration threads run while
the guest runs.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterable

from pyvm.block import DiskImage
from pyvm.chardev import parse_serial
from pyvm.clock import VirtualClock
from pyvm.config import MACHINE_TYPE, MachineConfig
from pyvm.cpu import VCpu
from pyvm.cpu_state import CpuState
from pyvm.cpu_throttle import CpuThrottle
from pyvm.devices.ata_disk import AtaDisk
from pyvm.devices.base import Device
from pyvm.devices.cmos_rtc import CmosRtc
from pyvm.devices.debug_exit import IsaDebugExit
from pyvm.devices.pic8259 import PicPair
from pyvm.devices.pit8254 import Pit8254 as Pit
from pyvm.devices.port92 import Port92
from pyvm.devices.post_port import PostPort
from pyvm.devices.uart16550 import Uart16550
from pyvm.errors import ConfigError, GuestFault, VmStateError
from pyvm.events import EventBus
from pyvm.fastpath import flush_tlb, track_host_writes, track_writes
from pyvm.ioport import IoBus
from pyvm.loader import BootImage, load_bios, load_boot_sector, load_kernel
from pyvm.log import Log
from pyvm.native_delivery import route_native_ports
from pyvm.native_idle import idle_ticker, wake_fd
from pyvm.ram import MemoryBackend, MemoryBackendConfig, RamBlock, RamLayout
from pyvm.runstate import RunState, RunStateMachine
from pyvm.tlb_tracking import TlbTracking, track_tlb_writes

# Run states from which ``cont`` starts the guest (QEMU: qmp_cont).
_CONT_OK = {RunState.PAUSED, RunState.PRELAUNCH, RunState.POSTMIGRATE, RunState.DEBUG,
            RunState.IO_ERROR, RunState.WATCHDOG, RunState.GUEST_PANICKED, RunState.SUSPENDED}


class _DiscardWrites:
    """A RAM layout stand-in that checks bounds but keeps nothing (incoming boots)."""

    def __init__(self, ram: RamLayout) -> None:
        self._ram = ram

    def write(self, gpa: int, data: bytes) -> None:
        if self._ram.find(gpa, len(data)) is None:
            raise ValueError(f"guest-physical range [{gpa:#x}, +{len(data):#x}) is not RAM")


class _DeviceContext:
    """What a device sees of the machine (pyvm.devices.base.DeviceContext)."""

    clock: Any

    def __init__(self, machine: "Machine") -> None:
        self._m = machine
        self.clock = machine.clock

    def set_irq(self, line: int, level: bool) -> None:
        self._m.set_irq(line, level)

    def kick(self) -> None:
        self._m.kick()

    def request_reset(self) -> None:
        self._m.request_reset("guest-reset")

    def request_exit(self, code: int) -> None:
        self._m.request_exit(code)

    def log(self, topic: str, message: str) -> None:
        self._m.log.once(topic, message) if topic == "unimp" else self._m.log.log(topic, message)


def cmos_memory_sizes(ram_size: int) -> list[tuple[int, bytes]]:
    """The CMOS bytes that tell a guest how much RAM it has, as QEMU's PC machine presets
    them (``hw/i386/pc.c``, ``pc_cmos_init``): (offset, little-endian bytes) pairs.

    pyvm's RAM is one block from address 0, so everything up to 4 GiB is below 4 GiB.
    """
    below_4g = min(ram_size, 4 << 30)
    above_4g = ram_size - below_4g
    base_kib = min(below_4g >> 10, 640)                             # 0x15/0x16
    ext_kib = min(max(below_4g - (1 << 20), 0) >> 10, 0xFFFF)       # 0x17/0x18 and 0x30/0x31
    above_16m = min(max(below_4g - (16 << 20), 0) >> 16, 0xFFFF)    # 64 KiB units, 0x34/0x35
    high = above_4g >> 16                                           # 64 KiB units, 0x5b-0x5d
    return [(0x15, base_kib.to_bytes(2, "little")),
            (0x17, ext_kib.to_bytes(2, "little")),
            (0x30, ext_kib.to_bytes(2, "little")),
            (0x34, above_16m.to_bytes(2, "little")),
            (0x5B, (high & 0xFFFFFF).to_bytes(3, "little"))]


class Machine:
    """A PC-like VM.  Construct, then :meth:`start`; :meth:`wait` returns the exit status."""

    machine_type = MACHINE_TYPE

    def __init__(self, cfg: MachineConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.uuid = cfg.uuid
        self.log = Log(cfg.log_items, cfg.log_file)
        self.events = EventBus()
        self.runstate = RunStateMachine(RunState.PRELAUNCH)
        self.runstate.add_listener(self._on_runstate)
        self.clock = VirtualClock()
        self.ram = RamLayout()
        self.backends: dict[str, MemoryBackend] = {}
        self._build_ram()
        self.iobus = IoBus(self.log)
        self.devices: list[Device] = []
        #: (reason, modes) registered by devices and options; see pyvm.migration.control.blockers
        self.migration_blockers: list[tuple[str, frozenset[str]]] = []
        self.char_backends: list[Any] = []
        self._ctx = _DeviceContext(self)
        self._build_devices()
        self.boot: BootImage = self._load_boot(into_ram=cfg.incoming is None)
        self.cpus = [VCpu(i, self.ram, self.boot.wide, self.iobus.read, self.iobus.write)
                     for i in range(cfg.smp)]
        self.cpu_states = [CpuState(c) for c in self.cpus]
        route_native_ports(self.cpus, self.devices, self.log.enabled)
        #: vCPU sleep shares (auto-converge, dirty limits); see pyvm.cpu_throttle
        self.throttle = CpuThrottle(len(self.cpus))
        #: nanoseconds each vCPU spent inside emu_start (dirty-page attribution, pyvm.dirty_meter)
        self.cpu_run_ns = [0] * len(self.cpus)
        self._dirty_clients: set[str] = set()
        self._requests: "queue.SimpleQueue[tuple[Callable[[], Any], threading.Event, list[Any]]]" = \
            queue.SimpleQueue()
        self._wake = threading.Condition()
        self._exit_code: int | None = None
        self._exit_event = threading.Event()
        self._loop_thread: threading.Thread | None = None
        self._trackers: list[Any] = []
        self._timer_devs: tuple[list[Device], list[Device]] | None = None
        self._kicked = False
        self._running: VCpu | None = None     # the vCPU inside emu_start, if any
        # The native idle tick (pyvm.native_idle): built at the first idle, with the
        # eventfd kick() writes while it runs (armed) so that its wait ends.
        self._idle_ticker: Any = None
        self._idle_devs = -1
        self._idle_fd = -1
        self._idle_armed = False
        self._idle_written = False
        self.dirty_logging = False
        self.loop_ident: int | None = None
        self.migration: Any = None          # set by the migration layer
        self.has_monitor = False
        self.autostart = not cfg.start_paused
        self._reset_cpus()

    # -- construction ---------------------------------------------------------------------
    def _build_ram(self) -> None:
        cfg = self.cfg
        if cfg.memory_backend:
            bcfg = cfg.backends.get(cfg.memory_backend)
            if bcfg is None:
                raise ConfigError(f"Memory backend '{cfg.memory_backend}' not found")
            if cfg.ram_size_given and cfg.ram_size != bcfg.size:
                raise ConfigError(f"-m size 0x{cfg.ram_size:x} does not match the size 0x{bcfg.size:x}"
                                  f" of memory-backend '{bcfg.id}'")
            name = bcfg.id
        else:
            bcfg = MemoryBackendConfig("memory-backend-ram", "pc.ram", cfg.ram_size, implicit=True)
            name = "pc.ram"
        for other in cfg.backends.values():
            if other is not bcfg:
                raise ConfigError(f"memory backend '{other.id}' is not used by the machine "
                                  f"(select it with -machine memory-backend={other.id})")
        backend = MemoryBackend(bcfg)
        self.backends[bcfg.id] = backend
        self.ram.add(RamBlock(name, 0, backend))
        self.ram_size = bcfg.size

    def _build_devices(self) -> None:
        self.pic = PicPair()
        self.pit = Pit()
        self.add_device(self.pic)
        self.add_device(self.pit)
        rtc = CmosRtc()
        for offset, data in cmos_memory_sizes(self.ram_size):
            rtc.write_nvram(offset, data)
        self.add_device(rtc)
        self.add_device(Port92())
        self.add_device(PostPort())
        self._build_serial()
        for dcfg in self.cfg.debug_exit:
            self.add_device(IsaDebugExit(iobase=dcfg.iobase, iosize=dcfg.iosize))
        self.disk = None
        if self.cfg.drives:
            if len(self.cfg.drives) > 1:
                raise ConfigError("only one -drive is supported (the primary IDE master)")
            d = self.cfg.drives[0]
            image = DiskImage(d.file, readonly=d.readonly, cache=d.cache)
            self.disk = AtaDisk(image)
            if d.cache == "writeback":
                # Dirty sectors live in this process until flushed: a second live process
                # must not open the image (normal mode), but cpr-reboot flushes at quit first.
                self.migration_blockers.append((
                    f"Migration is disabled: disk '{d.file}' uses cache=writeback, whose dirty "
                    "sectors stay in this process (use cache=writethrough, or cpr-reboot mode)",
                    frozenset({"normal"})))
            self.add_device(self.disk)

    def _build_serial(self) -> None:
        specs = self.cfg.serial or ["null"]
        if len(specs) > 1:
            raise ConfigError("only one -serial port (COM1) is supported")
        self.uart = None
        backend = parse_serial(specs[0], "serial0",
                               on_quit=lambda: self.request_exit(0, reason="host-signal"),
                               tls_objects=self.cfg.tls_objects)
        if backend is None:          # -serial none: no COM1 at all
            return
        self.uart = Uart16550(backend)
        self.char_backends.append(backend)
        self.add_device(self.uart)

    def add_device(self, dev: Device) -> None:
        dev.attach(self._ctx)
        for first, count in dev.ports():
            self.iobus.register(dev, first, count, dev.idstr or type(dev).__name__)
        self.devices.append(dev)

    def _load_boot(self, into_ram: bool = True) -> BootImage:
        """Load the boot image.  With ``into_ram`` false (an incoming migration) only its
        shape is read: guest RAM comes from the stream, or is already there in a shared
        backend (x-ignore-shared, cpr-reboot) and must not be overwritten."""
        cfg = self.cfg
        ram: Any = self.ram if into_ram else _DiscardWrites(self.ram)
        if cfg.kernel:
            return load_kernel(ram, cfg.kernel, cfg.append, cfg.initrd, self.ram_size)
        if cfg.bios:
            return load_bios(ram, cfg.bios)
        if cfg.drives:
            assert self.disk is not None
            return load_boot_sector(ram, self.disk.image.read(0, 1))
        raise ConfigError("no boot device: give -kernel, -bios or -drive")

    def _ram_from_stream(self) -> bool:
        """True until an incoming migration has loaded: guest RAM is the stream's."""
        return self.runstate.state is RunState.INMIGRATE or (
            self.cfg.incoming is not None and self.runstate.state is RunState.PRELAUNCH)

    def _reset_cpus(self) -> None:
        n = len(self.cpus)
        if self._ram_from_stream():
            # The state comes from the stream; the entry state would need tables that
            # an incoming boot does not write into guest RAM.
            for cpu in self.cpus:
                cpu.enter("real", {}, 0, runnable=False)
            return
        gdt_limit = len(self.boot.gdt) - 1 if self.boot.gdt else 0
        for cpu in self.cpus:
            st = self.boot.entry(cpu.index, n)
            cpu.enter(st.mode, st.regs, gdt_limit, st.runnable)
            if self.log.on("cpu_reset"):
                self.log.log("cpu_reset", f"vCPU {cpu.index} {st.mode} mode:\n{cpu.report()}")

    # -- migratable objects (what the migration layer saves, in order) ----------------------
    def migratable(self) -> list[Any]:
        return [self.clock, *self.cpu_states, *self.devices]

    # -- interrupts and kicks --------------------------------------------------------------
    def set_irq(self, line: int, level: bool) -> None:
        self.pic.set_irq(line, level)
        if level and self.pic.has_pending():
            self.kick()

    def kick(self) -> None:
        """Make the run loop look at its queues, IRQs and deadlines now (any thread).

        A running slice ends at its next translation block: the vCPU's native stopper
        turns the request into an exact ``uc_emu_stop`` on the vCPU's own thread.
        """
        with self._wake:
            cpu = self._running
            if cpu is None and threading.get_ident() == self.loop_ident:
                return      # the loop itself, between slices: it looks at IRQs before the next one
            self._kicked = True
            if cpu is not None:
                cpu.request_stop()
            if self._idle_armed and not self._idle_written:
                self._idle_written = True
                os.eventfd_write(self._idle_fd, 1)
            self._wake.notify()

    def _take_kick(self) -> bool:
        with self._wake:
            k, self._kicked = self._kicked, False
            return k

    # -- life cycle ------------------------------------------------------------------------
    def start(self) -> None:
        for c in self.char_backends:
            c.start()
        self._loop_thread = threading.Thread(target=self._loop_guarded, name="vcpu-loop", daemon=True)
        self._loop_thread.start()
        if self.cfg.incoming is not None:
            self.runstate.set(RunState.INMIGRATE)
        elif self.autostart:
            self.run_on_loop(self._resume)

    def wait(self) -> int:
        """Block until the VM ends; returns the process exit status."""
        while not self._exit_event.wait(0.2):
            pass
        assert self._exit_code is not None
        return self._exit_code

    @property
    def running_cpu(self) -> VCpu | None:
        """The vCPU inside ``emu_start`` on the loop thread right now, if any (read
        from other threads: postcopy charges a page fault of the loop thread to it)."""
        return self._running

    @property
    def exit_code(self) -> int | None:
        """The status the VM ended with, or None while it runs."""
        return self._exit_code if self._exit_event.is_set() else None

    def request_exit(self, code: int, reason: str | None = None) -> None:
        """End pyvm with ``code``; ``reason`` emits SHUTDOWN (host-qmp-quit, host-signal...)."""
        if self._exit_event.is_set():
            return
        if reason is not None:
            self.events.emit("SHUTDOWN", {"guest": False, "reason": reason})
        self._exit_code = code
        self._exit_event.set()
        for cpu in self.cpus:
            cpu.stop_in_hook = True
            cpu.request_stop()
        self.kick()

    def request_reset(self, reason: str) -> None:
        guest = reason.startswith("guest")
        if guest and self.cfg.no_reboot:
            self.shutdown(guest=True, reason=reason)
            return
        self._post(lambda: self._do_reset(guest, reason))

    def shutdown(self, guest: bool, reason: str) -> None:
        if self.cfg.no_shutdown:
            self.events.emit("SHUTDOWN", {"guest": guest, "reason": reason})
            self._post(lambda: self._pause(RunState.SHUTDOWN))
        else:
            self.request_exit(0, reason)

    def close(self) -> None:
        self._exit_event.set()
        if self._loop_thread and self._loop_thread is not threading.current_thread():
            self._loop_thread.join(timeout=5)
        for dev in self.devices:
            try:
                dev.close()
            except Exception as err:  # noqa: BLE001 - flush what can be flushed
                print(f"pyvm: closing {type(dev).__name__}: {err}", file=sys.stderr)
        for c in self.char_backends:
            c.close()
        if self._idle_fd >= 0 and (self._loop_thread is None or not self._loop_thread.is_alive()):
            os.close(self._idle_fd)
            self._idle_fd = -1

    # -- work from other threads -------------------------------------------------------------
    def _post(self, fn: Callable[[], Any]) -> threading.Event:
        done = threading.Event()
        self._requests.put((fn, done, []))
        self.kick()
        return done

    def run_on_loop(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """Run ``fn`` on the run-loop thread between slices; return its result or raise."""
        if threading.get_ident() == self.loop_ident or self._loop_thread is None:
            return fn()
        done = threading.Event()
        box: list[Any] = []
        self._requests.put((fn, done, box))
        self.kick()
        if not done.wait(timeout):
            raise TimeoutError("the vCPU loop did not answer")
        if box and isinstance(box[0], BaseException):
            raise box[0]
        return box[0] if box else None

    def _drain_requests(self) -> None:
        if self._requests.empty():
            return
        while True:
            try:
                fn, done, box = self._requests.get_nowait()
            except queue.Empty:
                return
            try:
                box.append(fn())
            except BaseException as err:  # noqa: BLE001 - handed back to the caller
                box.append(err)
            done.set()

    # -- run states (monitor commands) ----------------------------------------------------------
    def _on_runstate(self, old: RunState, new: RunState) -> None:
        if new is RunState.RUNNING:
            self.clock.start()
            self.events.emit("RESUME")
        elif old is RunState.RUNNING:
            self.clock.stop()
            self.events.emit("STOP")

    def _resume(self) -> None:
        self.runstate.set(RunState.RUNNING)

    def _pause(self, state: RunState) -> None:
        self.runstate.set(state)

    def stop(self) -> None:
        if self.runstate.state is RunState.INMIGRATE:
            # QEMU keeps the incoming VM from autostarting instead.
            self.autostart = False
            return
        self.run_on_loop(lambda: self._pause(RunState.PAUSED) if self.runstate.running else None)

    def cont(self) -> None:
        def go() -> None:
            st = self.runstate.state
            if st is RunState.RUNNING:
                return
            if st is RunState.INMIGRATE:
                raise VmStateError("Guest is waiting for an incoming migration")
            if st in (RunState.INTERNAL_ERROR, RunState.SHUTDOWN):
                raise VmStateError("Resetting the Virtual Machine is required")
            if st not in _CONT_OK and st is not RunState.FINISH_MIGRATE:
                raise VmStateError(f"cannot continue from state {st.value}")
            self.runstate.set(RunState.RUNNING)
        self.run_on_loop(go)

    def system_reset(self) -> None:
        self.run_on_loop(lambda: self._do_reset(False, "host-qmp-system-reset"))

    def _do_reset(self, guest: bool, reason: str) -> None:
        for dev in self.devices:
            dev.reset()
        # While a migration comes in, guest RAM belongs to the stream: reset devices and
        # vCPUs only (the loader's map of still-zero pages would miss the boot image).
        self.boot = self._load_boot(into_ram=not self._ram_from_stream())
        self._reset_cpus()
        self.events.emit("RESET", {"guest": guest, "reason": reason})
        if self.runstate.state in (RunState.INTERNAL_ERROR, RunState.SHUTDOWN,
                                   RunState.GUEST_PANICKED):
            self.runstate.set(RunState.PAUSED)

    def system_powerdown(self) -> None:
        # No ACPI in pyvm's PC: the event is all a guest could see (QEMU sends it too).
        self.events.emit("POWERDOWN")

    def quit(self) -> None:
        self.request_exit(0, "host-qmp-quit")

    # -- inspection (monitor) -----------------------------------------------------------------
    def read_physical(self, addr: int, size: int) -> bytes:
        return self.ram.read(addr, size)

    def read_virtual(self, cpu_index: int, addr: int, size: int) -> bytes:
        cpu = self._cpu(cpu_index)
        return bytes(self.run_on_loop(lambda: cpu.read_linear(addr, size)))

    def _cpu(self, index: int) -> VCpu:
        if not 0 <= index < len(self.cpus):
            raise ValueError(f"CPU index {index} is out of range")
        return self.cpus[index]

    def cpu_registers(self, cpu_index: int) -> dict[str, int]:
        """The monitor's register map (pyvm.qmp.vm_api.VmApi.cpu_registers): 64-bit names
        in every mode, descriptor tables as ``gdtr_*``/``idtr_*``, and ``halted``."""
        cpu = self._cpu(cpu_index)
        return dict(self.run_on_loop(cpu.register_state))

    def cpus_info(self) -> list[dict[str, Any]]:
        return [{"cpu-index": c.index, "qom-path": f"/machine/unattached/device[{c.index}]",
                 "thread-id": getattr(self, "loop_native_id", os.getpid()), "target": "x86_64",
                 "props": {"core-id": 0, "thread-id": 0, "socket-id": c.index}}
                for c in self.cpus]

    def memdevs(self) -> list[dict[str, Any]]:
        out = []
        for b in self.backends.values():
            if b.cfg.implicit:
                continue
            out.append({"id": b.cfg.id, "size": b.cfg.size, "merge": True, "dump": True,
                        "prealloc": b.cfg.prealloc, "share": b.cfg.share, "host-nodes": [],
                        "policy": "default"})
        return out

    def chardevs(self) -> list[dict[str, Any]]:
        return [c.info() for c in self.char_backends]

    def interrupt_controllers(self) -> list[tuple[str, str, list[int]]]:
        """(type name, ``info pic`` text, per-line rising-edge counts) of each controller."""
        pic = self.pic
        return [("isa-i8259", self.run_on_loop(pic.print_info), list(pic.irq_count))]

    def mtree(self) -> str:
        lines = ["address-space: memory",
                 "  0000000000000000-ffffffffffffffff (prio 0, i/o): system"]
        for b in self.ram:
            lines.append(f"    {b.gpa:016x}-{b.end - 1:016x} (prio 0, ram): {b.name}")
        lines += ["", "address-space: I/O", "  0000-ffff (prio 0, i/o): io"]
        for dev in self.devices:
            for first, count in dev.ports():
                lines.append(f"    {first:04x}-{first + count - 1:04x} (prio 0, i/o): "
                             f"{dev.idstr or type(dev).__name__}")
        return "\n".join(lines) + "\n"

    # -- throttling (auto-converge, dirty limits) -------------------------------------------------
    @property
    def cpu_throttle(self) -> int:
        """The VM-wide vCPU throttle in percent (0: off)."""
        return self.throttle.percentage

    def set_cpu_throttle(self, pct: int) -> None:
        """Throttle every vCPU to sleep ``pct`` percent of the time (0 removes it; others
        are clamped to 1..99 as QEMU's ``cpu_throttle_set`` does).  Any thread."""
        self.throttle.set_percentage(pct)
        self.kick()

    def set_vcpu_throttle(self, index: int, pct: int) -> None:
        """Throttle one vCPU (the dirty-page-rate limit's control).  Any thread."""
        self.throttle.set_vcpu_percentage(self._cpu(index).index, pct)
        self.kick()

    # -- dirty logging (migration) ------------------------------------------------------------
    def start_dirty_log(self, blocks: Iterable[RamBlock], client: str = "migration") -> None:
        """Start tracking writes to ``blocks`` (run-loop thread): every page starts dirty.

        Several clients may want the log (``migration``; ``dirty-rate`` for the dirty-page
        meter, pyvm.dirty_meter): it is attached once and detached when the last one
        stops.  A migration joining a log that is already on still finds every page dirty.

        The vCPUs' TLB fill (:mod:`pyvm.tlb_tracking`) is preferred: guest stores keep
        their fast path and only the first write to a page per sync takes a TLB refill.
        Without it, host write-protect (userfaultfd, :func:`pyvm.fastpath.track_host_writes`);
        where the kernel does not allow that either, a native write hook on every vCPU.
        """
        def attach() -> None:
            self._dirty_clients.add(client)
            if self.dirty_logging:
                if client == "migration":
                    for block in blocks:
                        block.dirty.mark_all()
                return
            blocks_ = list(blocks)
            for block in blocks_:
                block.dirty.fetch_and_clear()
                block.dirty.mark_all()
            tlb = track_tlb_writes([cpu.uc for cpu in self.cpus], blocks_)
            if tlb is not None:
                self._trackers.append(tlb)
                blocks_ = []
            for block in blocks_:
                host = track_host_writes(block.dirty, block.host_address, block.size)
                if host is not None:
                    self._trackers.append(host)
                    continue
                for cpu in self.cpus:
                    self._trackers.append(track_writes(cpu.uc, block.dirty, block.gpa, block.size))
                    flush_tlb(cpu.uc)   # fast-path TLB entries would skip the hook
            self.dirty_logging = True
        self.run_on_loop(attach)

    def dirty_log_clients(self) -> frozenset[str]:
        """Who keeps the dirty log on (see :meth:`start_dirty_log`)."""
        return frozenset(self._dirty_clients)

    @property
    def dirty_tracking_method(self) -> str | None:
        """"tlb", "host-wp", "write-hook" (or two, one per block) while dirty logging is on."""
        kinds = sorted({"tlb" if isinstance(t, TlbTracking) else
                        "host-wp" if hasattr(t, "collect_into") else "write-hook"
                        for t in self._trackers})
        return "+".join(kinds) if kinds else None

    def stop_dirty_log(self, client: str = "migration") -> None:
        def detach() -> None:
            self._dirty_clients.discard(client)
            if self._dirty_clients:
                return
            for t in self._trackers:
                t.detach()
            for cpu in self.cpus:
                flush_tlb(cpu.uc)   # let stores take the fast path again
            self._trackers.clear()
            self.dirty_logging = False
        self.run_on_loop(detach)

    # -- the run loop ----------------------------------------------------------------------------
    def _loop_guarded(self) -> None:
        self.loop_ident = threading.get_ident()
        self.loop_native_id = threading.get_native_id()
        try:
            self._loop()
        except BaseException as err:  # noqa: BLE001 - a bug must not hang the process silently
            traceback.print_exc()
            print(f"pyvm: internal error in the vCPU loop: {err}", file=sys.stderr)
            self._exit_code = 1
            self._exit_event.set()

    def _loop(self) -> None:
        slice_s = self.cfg.slice_ms / 1000.0
        rr = 0
        while not self._exit_event.is_set():
            self._drain_requests()
            self._take_kick()
            if not self.runstate.running:
                with self._wake:
                    if self._requests.empty() and not self._exit_event.is_set():
                        self._wake.wait(0.5)
                continue
            deadline = self._run_timers()
            self._deliver_interrupts()
            runnable = [c for c in self.cpus if not c.halted]
            if not runnable:
                if not self._idle_native():
                    self._idle(deadline)
                continue
            if self.throttle.active:
                runnable = self._awake(runnable, deadline)
                if not runnable:
                    continue
            cpu = runnable[rr % len(runnable)]
            rr += 1
            self._run_slice(cpu, slice_s, deadline)

    def _timer_devices(self) -> list[Device]:
        """The devices that have timers at all (override :meth:`Device.deadline`)."""
        if self._timer_devs is None or len(self._timer_devs[0]) != len(self.devices):
            devs = [d for d in self.devices if type(d).deadline is not Device.deadline]
            self._timer_devs = (list(self.devices), devs)
        return self._timer_devs[1]

    def _next_deadline_ns(self) -> int | None:
        deadlines = [d for d in (dev.deadline() for dev in self._timer_devices()) if d is not None]
        return min(deadlines) if deadlines else None

    def _run_timers(self) -> int | None:
        """Run the device timers that are due; return the earliest deadline left (or None).

        Nothing ticks: each device reports when it next needs the loop, and the loop
        sleeps or runs the guest until the earliest of those."""
        now = self.clock.now_ns()
        earliest: int | None = None
        for dev in self._timer_devices():
            d = dev.deadline()
            if d is None:
                continue
            if d <= now:
                dev.run_timers(now)
                d = dev.deadline()
                if d is None:
                    continue
            if earliest is None or d < earliest:
                earliest = d
        return earliest

    def _deliver_interrupts(self) -> None:
        cpu0 = self.cpus[0]
        if self.pic.has_pending() and cpu0.interrupts_enabled():
            vector = self.pic.acknowledge()
            if self.log.on("int"):
                self.log.log("int", f"vCPU 0: IRQ vector {vector:#x}")
            self._deliver(cpu0, vector, None)
            cpu0.halted = False

    def _deliver(self, cpu: VCpu, vector: int, error_code: int | None) -> None:
        try:
            cpu.deliver(vector, error_code)
        except GuestFault as fault:
            self._guest_fault(cpu, fault)

    def _awake(self, runnable: list[VCpu], deadline: int | None) -> list[VCpu]:
        """The runnable vCPUs that do not owe throttle sleep; when none, wait in the idle
        wait (timers, kicks and monitor work still run) until the first wakes."""
        now = time.monotonic_ns()
        wakes = [self.throttle.wake_ns(c.index) for c in runnable]
        awake = [c for c, w in zip(runnable, wakes) if w <= now]
        if not awake:
            self._idle(deadline, until_ns=min(wakes))
        return awake

    def _idle(self, deadline: int | None, until_ns: int | None = None) -> None:
        """Every vCPU is halted (or sleeps off its throttle until ``until_ns``, monotonic):
        block until the next device deadline or an event (a kick: an IRQ, a request from
        another thread).  No polling in between."""
        timeout = 0.5
        if until_ns is not None:
            timeout = max(0.0, min(timeout, (until_ns - time.monotonic_ns()) / 1e9))
        if deadline is not None:
            timeout = max(0.0, min(timeout, (deadline - self.clock.now_ns()) / 1e9))
        with self._wake:
            if self._kicked or not self._requests.empty():
                self._kicked = False
                return
            if self.pic.has_pending() and self.cpus[0].interrupts_enabled():
                return
            if timeout > 0:
                self._wake.wait(timeout)

    def _idle_native(self) -> bool:
        """Every vCPU is halted: run the idle tick natively (pyvm._idle: wait, and the
        PIT's interrupts delivered and handled, until something needs this loop).
        False where the Python path is to be used (:meth:`_idle` is its twin)."""
        if self._idle_devs != len(self.devices):
            self._idle_devs = len(self.devices)
            if self._idle_fd < 0:
                self._idle_fd = wake_fd()
            self._idle_ticker = idle_ticker(self, self._timer_devices(), self._idle_fd,
                                            int(self.cfg.slice_ms * 1e6))
        ticker = self._idle_ticker
        if ticker is None or self.throttle.active or self.log.on("int"):
            return False
        with self._wake:
            if self._kicked or not self._requests.empty():
                return False
            self._idle_armed = True
        try:
            ticker.run()
        finally:
            with self._wake:
                self._idle_armed = False
                if self._idle_written:
                    self._idle_written = False
                    os.eventfd_read(self._idle_fd)
        return True

    def _run_slice(self, cpu: VCpu, slice_s: float, deadline: int | None) -> None:
        budget_ns = int(slice_s * 1e9)
        if deadline is not None:
            budget_ns = min(budget_ns, max(0, deadline - self.clock.now_ns()))
        if cpu.index == 0 and self.pic.has_pending() and not cpu.interrupts_enabled():
            # An IRQ waits for IF=1 (an "interrupt window", as KVM calls it).  Slices that
            # end at a SYSCALL or an exception end with IF=0, so a guest that makes system
            # calls faster than the slice length would never see the IRQ: stop at the
            # stopper's next check (every 256 blocks) instead, and look again.
            budget_ns = 0
        cpu.stopper.set_deadline(time.monotonic_ns() + budget_ns)
        stops = cpu.stopper.stops
        with self._wake:
            cpu.clear_stop()
            if self._kicked:
                cpu.request_stop()
            self._running = cpu
        started = time.monotonic_ns()
        try:
            cpu.emu_start()
        finally:
            with self._wake:
                self._running = None
        now = time.monotonic_ns()
        self.cpu_run_ns[cpu.index] += now - started
        if self.throttle.active:
            self.throttle.charge(cpu.index, now - started, now)
        self._slice_done(cpu, stops)

    def _slice_done(self, cpu: VCpu, stops: int) -> None:
        """After a run of ``cpu`` (``stops``: its stopper's count before): a fault, an
        exception to deliver, or HLT (also the end of pyvm._idle's runs)."""
        if cpu.fault is not None:
            fault, cpu.fault = cpu.fault, None
            self._guest_fault(cpu, fault)
            return
        if cpu.pending_exception is not None:
            vector, cpu.pending_exception = cpu.pending_exception, None
            error_code, cpu.pending_error_code = cpu.pending_error_code, None
            if self.log.on("int"):
                self.log.log("int", f"vCPU {cpu.index}: exception/int {vector:#x}"
                             + (f" error code {error_code:#x}" if error_code is not None else ""))
            self._deliver(cpu, vector, error_code)
            return
        if cpu.stop_in_hook or cpu.syscalled or cpu.stopper.stops != stops:
            return
        # Returned by itself, with no stop asked for: HLT, or Unicorn's triple fault
        # (QEMU target/i386/excp_helper.c check_exception returns EXCP_HLT for it).
        if cpu.stopped_at_hlt():
            cpu.halted = True
        else:
            self._guest_fault(cpu, GuestFault(f"vCPU {cpu.index}: triple fault"))

    def _guest_fault(self, cpu: VCpu, fault: GuestFault) -> None:
        report = f"pyvm: guest fault, vCPU {cpu.index} stopped: {fault}\n{cpu.report()}"
        print(report, file=sys.stderr, flush=True)
        self.log.log("guest_errors", report)
        self.runstate.set(RunState.INTERNAL_ERROR)
        if not self.has_monitor:
            self.request_exit(1)
