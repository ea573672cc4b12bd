"""One virtual CPU: a Unicorn x86 engine over the machine's RAM.

Unicorn runs guest code; pyvm adds what a PC needs around it:

- **Port I/O** through ``UC_HOOK_INSN`` on IN/OUT, dispatched to the machine's I/O bus.
- **External interrupts**: Unicorn has no interrupt pin, so the run loop stops the vCPU
  at a slice boundary and vectors the interrupt itself, exactly as the CPU would (Intel
  SDM Vol. 3, 6.12 "Exception and interrupt handling"): through the IVT in real mode, a
  32-bit IDT gate in protected mode, a 16-byte gate in long mode.
- **Exceptions raised by guest code** (``int n``, #GP, #PF ...) reach ``UC_HOOK_INTR``;
  they are delivered the same way, with the error code the CPU pushes (read inside the
  hook: Unicorn clears it when the instruction runs again).  A fault that cannot be
  delivered escalates to #DF and then to a triple fault, which stops the guest with a
  report.  Unicorn never runs QEMU's delivery, which is what clears QEMU's "exception in
  flight" marker; pyvm clears it before the next ``emu_start`` (else the second #PF
  would become a double fault).  An invalid opcode (``ud2``), which Unicorn reports as
  ``UC_ERR_INSN_INVALID``, becomes #UD in the guest.
- **Privilege changes**: an interrupt or exception taken in ring 3 switches to ring 0
  and to the stack the TSS names (RSP0, or an IST stack in long mode; SS0:ESP0 in
  protected mode).  ``SYSCALL`` (which Unicorn only reports) is carried out from STAR,
  LSTAR/CSTAR and SFMASK; ``SYSRET`` and ``IRET`` run natively.  Unicorn changes the
  CPL only when SS is loaded or on its own returns, so pyvm sets it through
  :mod:`pyvm.unicorn_internals`.
- **CPUID** is Unicorn's ``qemu64`` model minus what pyvm's PC does not have: no local
  APIC, x2APIC or TSC deadline timer (leaf 1), so a guest uses the 8259 PIC and the PIT.
- **HLT** makes ``emu_start`` return; the machine then idles the vCPU until an interrupt.
  A return that is neither a stop request nor just after a HLT instruction is Unicorn's
  triple fault and stops the guest with a report.

Engine mode: Unicorn fixes the register view when an engine is opened.  A ``UC_MODE_32``
engine runs real mode, protected mode and (below 4 GiB) long mode, with 32-bit register
access; ``-kernel`` ELF64 guests get a ``UC_MODE_64`` engine with the full 64-bit view.
Limits (documented in docs/machine.md): no virtual-8086 mode delivery, no task gates,
no gate privilege checks for ``int n`` from ring 3; the target CPL of an interrupt gate
is taken from its selector's RPL; SYSENTER/SYSEXIT are Unicorn's own.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any, Callable

import unicorn as uc_mod
from unicorn import x86_const as X

from unicorn.unicorn_py3 import unicorn as ucmod

from pyvm.cpu_state import CPU_VMSD, CpuState, CpuStateError, load_cpu, save_cpu  # noqa: F401 - re-exported
from pyvm.errors import GuestFault
from pyvm.fastpath import slice_stopper
from pyvm.loader import GDT_ADDR, PAGE_TABLES
from pyvm.native_delivery import STATUS_FAULT, STATUS_OK, native_delivery, native_port_hooks
from pyvm.ram import RamLayout
from pyvm.unicorn_internals import ContextAccess, ExceptionState

MSR_EFER = 0xC0000080
EFER_LMA = 1 << 10
CR0_PE = 1 << 0
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFLAGS_IF = 1 << 9
EFLAGS_TF = 1 << 8
EFLAGS_NT = 1 << 14
EFLAGS_RF = 1 << 16
EFLAGS_VM = 1 << 17
EFER_SCE = 1 << 0
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SFMASK = 0xC0000084
HF_CS64 = 1 << 15           # QEMU target/i386/cpu.h HF_CS64_MASK: CS.L in long mode
VECTOR_UD = 6
HLT_OPCODE = 0xF4
# CPUID leaf 1 bits pyvm's PC does not provide (SDM Vol. 2A, CPUID, table 3-10/3-11).
CPUID1_EDX_HIDE = 1 << 9                     # APIC: no local APIC
CPUID1_ECX_HIDE = (1 << 21) | (1 << 24)      # x2APIC, TSC-deadline timer
# Exceptions that push an error code (SDM Vol. 3, table 6-1).
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21})

GPR64 = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
GPR32 = ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp")
SEGMENTS = ("es", "cs", "ss", "ds", "fs", "gs")
SEGMENTS_ALL = SEGMENTS + ("ldtr", "tr")


_REG_IDS: dict[str, int] = {}


def _reg(name: str) -> int:
    rid = _REG_IDS.get(name)
    if rid is None:
        rid = _REG_IDS[name] = int(getattr(X, "UC_X86_REG_" + name.upper()))
    return rid


def _raw_reg_functions() -> tuple[Any, Any]:
    """uc_reg_read/uc_reg_write through ctypes directly: the binding's generic path costs
    several microseconds per register, and interrupt delivery touches a dozen."""
    read = ucmod.uclib.uc_reg_read
    write = ucmod.uclib.uc_reg_write
    return read, write


_RAW_READ, _RAW_WRITE = _raw_reg_functions()


class _Msr(ctypes.Structure):
    """uc_x86_msr (unicorn/x86.h)."""
    _fields_ = [("rid", ctypes.c_uint32), ("value", ctypes.c_uint64)]


class _Mmr(ctypes.Structure):
    """uc_x86_mmr (unicorn/x86.h): GDTR, IDTR, LDTR, TR."""
    _fields_ = [("selector", ctypes.c_uint16), ("base", ctypes.c_uint64),
                ("limit", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


IoRead = Callable[[int, int], int]
IoWrite = Callable[[int, int, int], None]


REAL_MODE_CS_FLAGS = 0x9B00


class _Stop(Exception):
    """Internal: raised in a hook to end the slice with a reason."""


class VCpu:
    """A vCPU.  Every method runs on the vCPU (run loop) thread; another thread ends a
    run with ``stopper.request()``."""

    def __init__(self, index: int, ram: RamLayout, wide: bool,
                 io_read: IoRead, io_write: IoWrite) -> None:
        self.index = index
        self.instance_id = index
        self.wide = wide
        self.ram = ram
        self.uc = uc_mod.Uc(uc_mod.UC_ARCH_X86, uc_mod.UC_MODE_64 if wide else uc_mod.UC_MODE_32)
        self.uc.ctl_set_cpu_model(X.UC_CPU_X86_QEMU64)
        # No "until" address: Unicorn looks up the code page of emu_start's ``until``, and
        # in long mode the #GP/#PF of that lookup (nothing maps it) is left behind as an
        # exception in flight, so the guest's next fault would become a double fault.
        self.uc.ctl_exits_enabled(True)
        self.uc.ctl_set_exits([])
        self._uch = self.uc._uch
        # State without a Unicorn register id (segment caches, hflags, TSC offset).
        self.internals = ContextAccess(self.uc)
        for block in ram:
            self.uc.mem_map_ptr(block.gpa, block.size, uc_mod.UC_PROT_ALL, block.host_address)
        self._io_read = io_read
        self._io_write = io_write
        self.halted = False
        self.pending_exception: int | None = None
        self.pending_error_code: int | None = None
        self._in_flight = False          # an exception was hooked since the last emu_start
        self._syscall = False            # SYSCALL reported by the hook, to carry out
        self.syscalled = False           # the last emu_start ended at a SYSCALL
        self.fault: GuestFault | None = None
        self.hook_error: BaseException | None = None
        self.stop_in_hook = False
        # Native delivery and exception hook (None: the Python versions, the twins);
        # PYVM_DELIVERY=python selects those.
        self.native_delivery = native_delivery(self)
        # Native IN/OUT hooks with the native delivery (pyvm._portio); else the Python ones.
        self.port_hooks = native_port_hooks(self, io_read, io_write)
        self._hooks = [] if self.port_hooks is not None else [
            self.uc.hook_add(uc_mod.UC_HOOK_INSN, self._on_in, None, 1, 0, X.UC_X86_INS_IN),
            self.uc.hook_add(uc_mod.UC_HOOK_INSN, self._on_out, None, 1, 0, X.UC_X86_INS_OUT),
        ]
        self._hooks += [
            self.uc.hook_add(uc_mod.UC_HOOK_INSN, self._on_syscall, None, 1, 0, X.UC_X86_INS_SYSCALL),
            self.uc.hook_add(uc_mod.UC_HOOK_INSN, self._on_cpuid, None, 1, 0, X.UC_X86_INS_CPUID),
            # Only outside RAM: a memory hook covering RAM would keep every store on
            # Unicorn's slow path (cputlb.c never marks such TLB entries dirty).
            self.uc.hook_add(uc_mod.UC_HOOK_MEM_INVALID, self._on_invalid_mem, None,
                             ram.total, (1 << 64) - 1),
        ]
        if self.native_delivery is None:
            self._hooks.append(self.uc.hook_add(uc_mod.UC_HOOK_INTR, self._on_intr))
        self._vmem_translate = _vmem_translate_fn()
        self.exceptions = ExceptionState(self.internals)
        # Exact stops between translation blocks (pyvm.fastpath.slice_stopper).
        self.stopper = slice_stopper(self.uc)

    # -- hooks (guarded: an exception is stored and the slice ends) -----------------------
    def _guard(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except BaseException as err:  # noqa: BLE001 - re-raised after emu_start returns
            self.hook_error = err
            self.uc.emu_stop()
            return None

    def _on_in(self, uc: Any, port: int, size: int, _ud: Any) -> int:
        value = self._guard(lambda: self._io_read(port, size))
        return int(value if value is not None else (1 << (8 * size)) - 1)

    def _on_out(self, uc: Any, port: int, size: int, value: int, _ud: Any) -> None:
        self._guard(lambda: self._io_write(port, size, value))
        if self.stop_in_hook:
            self.uc.emu_stop()

    def _on_intr(self, uc: Any, intno: int, _ud: Any) -> None:
        # Deliver on the run-loop side: the hook only records it and ends the slice.
        got = self._guard(self.exceptions.in_hook)
        error_code, is_int = got if got is not None else (0, False)
        self.pending_exception = intno
        self.pending_error_code = None if is_int or intno not in ERROR_CODE_VECTORS else error_code
        self._in_flight = True
        self.uc.emu_stop()

    def _take_native_exception(self, native: Any) -> None:
        """What the C exception hook saw in the last run, as :meth:`_on_intr` records it."""
        self._record_native_exception(native, native.take())

    def _record_native_exception(self, native: Any, got: tuple[int, int, bool] | None) -> None:
        if got is None:
            return
        intno, error_code, is_int = got
        if native.hook_error:
            self.hook_error = uc_mod.UcError(native.hook_error)
        self.pending_exception = intno
        self.pending_error_code = None if is_int or intno not in ERROR_CODE_VECTORS else error_code
        self._in_flight = True

    def _on_syscall(self, uc: Any, _ud: Any) -> None:
        # Unicorn's helper_syscall only calls hooks and steps over the instruction.
        self._syscall = True
        self.uc.emu_stop()

    def _on_cpuid(self, uc: Any, _ud: Any) -> int:
        # 1: skip Unicorn's CPUID (we answered), 0: let it answer (QEMU misc_helper.c).
        return 1 if self._guard(self._cpuid) else 0

    def _cpuid(self) -> bool:
        if self.get("eax") & 0xFFFFFFFF != 1:
            return False
        eax, ebx, ecx, edx = _cpuid_leaf1()
        values = (eax, ebx, ecx & ~CPUID1_ECX_HIDE, edx & ~CPUID1_EDX_HIDE)
        for name, value in zip(("ax", "bx", "cx", "dx"), values):
            self.set(("r" if self.wide else "e") + name, value)
        return True

    def _on_invalid_mem(self, uc: Any, access: int, address: int, size: int, value: int,
                        _ud: Any) -> bool:
        kind = {uc_mod.UC_MEM_READ_UNMAPPED: "read from", uc_mod.UC_MEM_WRITE_UNMAPPED: "write to",
                uc_mod.UC_MEM_FETCH_UNMAPPED: "instruction fetch from"}.get(access, "access to")
        self.fault = GuestFault(f"vCPU {self.index}: {kind} unmapped guest address {address:#x}"
                                f" ({size} bytes)")
        return False

    # -- running -----------------------------------------------------------------------------
    def emu_start(self) -> None:
        """Run from the current instruction until HLT, a stop request, an exception or a fault."""
        native = self.native_delivery
        if self._in_flight:
            if native is None:
                self.exceptions.clear_in_flight()
            else:
                failed = native.clear_in_flight()
                if failed:
                    raise uc_mod.UcError(failed)
            self._in_flight = False
        if native is None:
            pc = self.pc
        else:
            pc = native.pc()
            if pc < 0:
                raise uc_mod.UcError(-pc)
        run_error: uc_mod.UcError | None = None
        try:
            self.uc.emu_start(pc, 1 << 62)     # exits mode (see __init__): no end address is set
        except uc_mod.UcError as err:
            run_error = err
        if native is not None:
            self._take_native_exception(native)
        self._after_run(run_error)

    def finish_run(self, errno: int, taken: tuple[int, int, bool] | None,
                   hook_exception: BaseException | None) -> None:
        """The end of :meth:`emu_start` for a run that pyvm._idle started natively:
        ``errno`` is ``uc_emu_start``'s status, ``taken`` what the native exception hook
        saw (its ``take()``), ``hook_exception`` what the binding's hook guard kept."""
        native = self.native_delivery
        if taken is not None and native is not None:
            self._record_native_exception(native, taken)
        run_error = uc_mod.UcError(errno) if errno else None
        if hook_exception is not None and run_error is None:
            raise hook_exception        # as Uc.emu_start raises it
        self._after_run(run_error)

    def _after_run(self, run_error: uc_mod.UcError | None) -> None:
        if run_error is not None:
            if run_error.errno == uc_mod.UC_ERR_INSN_INVALID and self.pending_exception is None \
                    and self.fault is None:
                self.pending_exception, self.pending_error_code = VECTOR_UD, None
            elif self.fault is None and self.pending_exception is None:
                self.fault = GuestFault(f"vCPU {self.index}: {run_error}")
        if self.hook_error is not None:
            err2, self.hook_error = self.hook_error, None
            raise err2
        self.syscalled = self._syscall
        if self._syscall:
            self._syscall = False
            self._do_syscall()

    def stopped_at_hlt(self) -> bool:
        """True when the instruction just before the current one is HLT (how Unicorn
        leaves a vCPU that halted; its triple fault looks the same otherwise)."""
        if self.native_delivery is None:
            return self.stopped_at_hlt_python()
        got = self.native_delivery.stopped_at_hlt()
        if got < 0:
            raise uc_mod.UcError(-got)
        return bool(got)

    def stopped_at_hlt_python(self) -> bool:
        """The Python version of :meth:`stopped_at_hlt`."""
        try:
            return self.read_linear(self._code_base() + self.pc - 1, 1)[0] == HLT_OPCODE
        except ValueError:
            return False

    def _code_base(self) -> int:
        if not self.cr0 & CR0_PE:
            return self.get("cs") << 4
        if self.long_mode:
            return 0
        return self._segment_base(self.get("cs"))

    def _do_syscall(self) -> None:
        """SYSCALL (SDM Vol. 2B): Unicorn has stepped over it; do the rest."""
        w = self.wide
        if not self.efer & EFER_SCE:
            self.set("rip" if w else "eip", self.pc - 2)
            self.pending_exception, self.pending_error_code = VECTOR_UD, None
            return
        star = self.uc.msr_read(MSR_STAR)
        flags = self.get("rflags" if w else "eflags")
        kernel_cs = (star >> 32) & 0xFFFC
        if self.long_mode:
            cs64 = bool(self.internals.read("hflags") & HF_CS64)
            target = self.uc.msr_read(MSR_LSTAR if cs64 else MSR_CSTAR)
            self.set("rcx" if w else "ecx", self.pc)
            if w:
                self.set("r11", flags & ~EFLAGS_RF)
            new_flags = flags & ~(self.uc.msr_read(MSR_SFMASK) | EFLAGS_RF)
        else:
            target = star & 0xFFFFFFFF
            self.set("ecx", self.pc)
            new_flags = flags & ~(EFLAGS_VM | EFLAGS_IF | EFLAGS_RF)
        self.exceptions.set_cpl(0)
        self.set("cs", kernel_cs)
        self.set("ss", kernel_cs + 8)
        self.set("rflags" if w else "eflags", new_flags)
        self.set("rip" if w else "eip", target)

    def request_stop(self) -> None:
        """End the current (or next) run at a block boundary; any thread."""
        self.stopper.request()

    def clear_stop(self) -> None:
        self.stopper.clear()

    @property
    def pc(self) -> int:
        return self.get("rip" if self.wide else "eip")

    # -- registers ---------------------------------------------------------------------------
    def get(self, name: str) -> int:
        """A scalar register (at most 64 bits) by Unicorn name: "eax", "cr0", "cs"..."""
        buf = ctypes.c_uint64(0)
        err = _RAW_READ(self._uch, _reg(name), ctypes.byref(buf))
        if err:
            raise uc_mod.UcError(err)
        return buf.value

    def set(self, name: str, value: int) -> None:
        buf = ctypes.c_uint64(value & 0xFFFFFFFFFFFFFFFF)
        err = _RAW_WRITE(self._uch, _reg(name), ctypes.byref(buf))
        if err:
            raise uc_mod.UcError(err)

    @property
    def efer(self) -> int:
        msr = _Msr(MSR_EFER, 0)
        err = _RAW_READ(self._uch, X.UC_X86_REG_MSR, ctypes.byref(msr))
        if err:
            raise uc_mod.UcError(err)
        return int(msr.value)

    def table_register(self, name: str) -> tuple[int, int]:
        """(base, limit) of "gdtr" or "idtr"."""
        mmr = _Mmr()
        err = _RAW_READ(self._uch, _reg(name), ctypes.byref(mmr))
        if err:
            raise uc_mod.UcError(err)
        return int(mmr.base), int(mmr.limit)

    @property
    def cr0(self) -> int:
        return self.get("cr0")

    @property
    def long_mode(self) -> bool:
        return bool(self.efer & EFER_LMA)

    def registers(self) -> dict[str, int]:
        """A name -> value map for fault reports (the short form)."""
        out: dict[str, int] = {}
        names = GPR64 + ("rip", "rflags") if self.wide else GPR32 + ("eip", "eflags")
        for n in names:
            out[n] = self.get(n)
        for s in SEGMENTS:
            out[s] = self.get(s)
        for c in ("cr0", "cr2", "cr3", "cr4"):
            out[c] = self.get(c)
        out["efer"] = self.efer
        _, gb, gl, _ = self.uc.reg_read(X.UC_X86_REG_GDTR)
        _, ib, il, _ = self.uc.reg_read(X.UC_X86_REG_IDTR)
        out.update(gdt_base=gb, gdt_limit=gl, idt_base=ib, idt_limit=il)
        return out

    def register_state(self) -> dict[str, int]:
        """Everything ``info registers`` shows, under the names pyvm/qmp/hmp_format.py reads:
        the saved CPU state (pyvm/cpu_state.py) with the segment caches spelt out."""
        st = CpuState(self)
        save_cpu(self, st)
        out: dict[str, int] = {}
        out.update(zip(GPR64, st.regs))         # the formatter reads 64-bit names in any mode
        out.update(rip=st.rip, rflags=st.rflags, efer=st.efer, cpl=st.cpl, halted=st.halted,
                   gdtr_base=st.gdt_base, gdtr_limit=st.gdt_limit,
                   idtr_base=st.idt_base, idtr_limit=st.idt_limit,
                   fpcw=st.fpcw, fpsw=st.fpsw, mxcsr=st.mxcsr,
                   # QEMU shows the abridged tag: bit i set when FP(i) is not empty
                   fptw=sum(1 << i for i in range(8) if (st.fptag >> (2 * i)) & 3 != 3))
        for i, name in enumerate(SEGMENTS_ALL):
            out[name] = st.seg_selector[i]
            out[f"{name}_base"] = st.seg_base[i]
            out[f"{name}_limit"] = st.seg_limit[i]
            out[f"{name}_flags"] = st.seg_flags[i]
        out.update(zip(("cr0", "cr2", "cr3", "cr4", "cr8"), st.cr))
        out.update((f"dr{i}", v) for i, v in enumerate(st.dr))
        for i in range(8):              # QEMU's FPRn are the physical registers, not ST(n)
            out[f"st{i}"] = int.from_bytes(st.fpregs[10 * i:10 * i + 10], "little")
        for i in range(16 if self.wide else 8):
            out[f"xmm{i}"] = int.from_bytes(st.xmm[16 * i:16 * i + 16], "little")
        return out

    # -- guest memory through the CPU's view -------------------------------------------------------
    def translate(self, linear: int, write: bool = False) -> int:
        """Linear -> guest-physical through the guest's page tables (identity when paging is off)."""
        if not self.cr0 & CR0_PG:
            return linear & 0xFFFFFFFF      # no paging, so no long mode either (SDM 9.8.5)
        phys = ctypes.c_uint64(0)
        prot = uc_mod.UC_PROT_WRITE if write else uc_mod.UC_PROT_READ
        err = self._vmem_translate(self.uc._uch, ctypes.c_uint64(linear), prot, ctypes.byref(phys))
        if err != 0:
            raise ValueError(f"linear address {linear:#x} is not mapped by the guest")
        return int(phys.value)

    def read_linear(self, linear: int, size: int) -> bytes:
        out = bytearray()
        while size > 0:
            chunk = min(size, 0x1000 - (linear & 0xFFF))
            out += self.ram.read(self.translate(linear), chunk)
            linear += chunk
            size -= chunk
        return bytes(out)

    def write_linear(self, linear: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            chunk = min(len(data) - pos, 0x1000 - (linear & 0xFFF))
            self.ram.write(self.translate(linear, write=True), data[pos:pos + chunk])
            linear += chunk
            pos += chunk

    def _segment_base(self, selector: int) -> int:
        """Base of a segment, read from the descriptor table (protected mode)."""
        if not self.cr0 & CR0_PE:
            return (selector & 0xFFFF) << 4
        if self.long_mode:
            return 0
        gdt_base, gdt_limit = self.table_register("gdtr")
        index = selector & ~7
        if selector & 4 or index + 7 > gdt_limit:
            return 0
        d = int.from_bytes(self.read_linear(gdt_base + index, 8), "little")
        return ((d >> 16) & 0xFFFFFF) | (((d >> 56) & 0xFF) << 24)

    # -- interrupt and exception delivery --------------------------------------------------
    def interrupts_enabled(self) -> bool:
        if self.native_delivery is not None:        # asked at every loop turn: skip ctypes
            got = self.native_delivery.interrupts_enabled()
            if got < 0:
                raise uc_mod.UcError(-got)
            return bool(got)
        return bool(self.get("rflags" if self.wide else "eflags") & EFLAGS_IF)

    def deliver(self, vector: int, error_code: int | None = None) -> None:
        """Vector an interrupt or exception through the IVT/IDT as the CPU would: natively
        (:mod:`pyvm._delivery`) when built, else by :meth:`deliver_python`, its twin."""
        native = self.native_delivery
        if native is None:
            self.deliver_python(vector, error_code)
            return
        status, detail, message = native.deliver(vector, error_code)
        if status == STATUS_FAULT:
            raise GuestFault(f"vCPU {self.index}: triple fault while delivering vector "
                             f"{detail:#x}: {message}")
        if status != STATUS_OK:
            raise uc_mod.UcError(detail)

    def deliver_python(self, vector: int, error_code: int | None = None, depth: int = 0) -> None:
        """The Python version of :meth:`deliver` (the reference the native one is tested against)."""
        cpl = 0
        try:
            if not self.cr0 & CR0_PE:
                self._deliver_real(vector)
                return
            cpl = self.exceptions.cpl()
            if cpl:
                # The IDT, TSS and new stack are read as supervisor (SDM Vol. 3, 4.6.1
                # "implicit supervisor-mode accesses"): page walks run at CPL 0.
                self.exceptions.set_cpl(0)
            if self.long_mode:
                self._deliver_long(vector, error_code, cpl)
            else:
                self._deliver_protected(vector, error_code, cpl)
        except (ValueError, _Stop) as err:
            if cpl:
                self.exceptions.set_cpl(cpl)
            if depth >= 1 or vector == 8:
                raise GuestFault(f"vCPU {self.index}: triple fault while delivering vector "
                                 f"{vector:#x}: {err}") from err
            self.deliver_python(8, 0, depth + 1)   # double fault

    def _push16(self, ss_base: int, sp: int, value: int) -> int:
        sp = (sp - 2) & 0xFFFF
        self.write_linear(ss_base + sp, struct.pack("<H", value & 0xFFFF))
        return sp

    def _deliver_real(self, vector: int) -> None:
        ivt_base, ivt_limit = self.table_register("idtr")
        if vector * 4 + 3 > ivt_limit:
            raise ValueError(f"vector {vector:#x} beyond the IVT limit")
        ip, cs = struct.unpack("<HH", self.read_linear(ivt_base + vector * 4, 4))
        flags = self.get("eflags")
        ss = self.get("ss")
        ss_base = ss << 4
        sp = self.get("esp") & 0xFFFF
        sp = self._push16(ss_base, sp, flags)
        sp = self._push16(ss_base, sp, self.get("cs"))
        sp = self._push16(ss_base, sp, self.get("eip"))
        self.set("esp", (self.get("esp") & 0xFFFF0000) | sp)
        self.set("eflags", flags & ~(EFLAGS_IF | EFLAGS_TF))
        self.set("cs", cs)
        self.set("eip", ip)

    def _deliver_protected(self, vector: int, error_code: int | None, cpl: int) -> None:
        idt_base, idt_limit = self.table_register("idtr")
        if vector * 8 + 7 > idt_limit:
            raise ValueError(f"vector {vector:#x} beyond the IDT limit")
        lo, hi = struct.unpack("<II", self.read_linear(idt_base + vector * 8, 8))
        gate_type = (hi >> 8) & 0xF
        if not hi & (1 << 15):
            raise ValueError(f"IDT gate {vector:#x} not present")
        if gate_type not in (0xE, 0xF):
            raise ValueError(f"IDT gate {vector:#x} has unsupported type {gate_type:#x}")
        offset = (lo & 0xFFFF) | (hi & 0xFFFF0000)
        selector = lo >> 16
        flags = self.get("eflags")
        if flags & EFLAGS_VM:
            raise ValueError("interrupt in virtual-8086 mode (unsupported)")
        new_cpl = selector & 3
        old_ss, esp = self.get("ss"), self.get("esp")
        words = [flags, self.get("cs"), self.get("eip")]
        if new_cpl < cpl:
            # Inner-privilege stack from the 32-bit TSS: ESPn at 4 + 8n, SSn at 8 + 8n.
            new_ss, new_esp = self._tss32_stack(new_cpl)
            words = [old_ss, esp] + words
        else:
            new_ss, new_esp = old_ss, esp
        if vector in ERROR_CODE_VECTORS and error_code is not None:
            words.append(error_code)
        new_esp = (new_esp - 4 * len(words)) & 0xFFFFFFFF
        # The frame, lowest address first: [error code], EIP, CS, EFLAGS[, ESP, SS].
        frame = struct.pack(f"<{len(words)}I", *(w & 0xFFFFFFFF for w in reversed(words)))
        self.write_linear(self._segment_base(new_ss) + new_esp, frame)
        if new_cpl < cpl:
            self.exceptions.set_cpl(new_cpl)
            self.set("cs", selector)
            self.set("ss", new_ss)
        elif cpl:
            self.exceptions.set_cpl(cpl)        # same privilege: back to where it was
        self.set("esp", new_esp)
        new_flags = flags & ~(EFLAGS_TF | EFLAGS_NT | EFLAGS_RF | EFLAGS_VM)
        if gate_type == 0xE:
            new_flags &= ~EFLAGS_IF
        self.set("eflags", new_flags)
        if selector != self.get("cs"):
            self.set("cs", selector)
        self.set("eip", offset)

    def _tss_base(self) -> int:
        _sel, base, limit, _flags = self.uc.reg_read(X.UC_X86_REG_TR)
        if limit < 0x67:
            raise ValueError(f"no usable TSS for a stack switch (TR limit {limit:#x})")
        return int(base)

    def _tss32_stack(self, cpl: int) -> tuple[int, int]:
        esp, ss = struct.unpack("<II", self.read_linear(self._tss_base() + 4 + 8 * cpl, 8))
        return ss & 0xFFFF, esp

    def _deliver_long(self, vector: int, error_code: int | None, cpl: int) -> None:
        idt_base, idt_limit = self.table_register("idtr")
        if vector * 16 + 15 > idt_limit:
            raise ValueError(f"vector {vector:#x} beyond the IDT limit")
        raw = self.read_linear(idt_base + vector * 16, 16)
        lo, hi, upper, _ = struct.unpack("<IIII", raw)
        gate_type = (hi >> 8) & 0xF
        if not hi & (1 << 15):
            raise ValueError(f"IDT gate {vector:#x} not present")
        if gate_type not in (0xE, 0xF):
            raise ValueError(f"IDT gate {vector:#x} has unsupported type {gate_type:#x}")
        offset = (lo & 0xFFFF) | (hi & 0xFFFF0000) | (upper << 32)
        selector = lo >> 16
        ist = hi & 7
        w = self.wide
        flags = self.get("rflags" if w else "eflags")
        rsp = self.get("rsp" if w else "esp")
        rip = self.get("rip" if w else "eip")
        new_cpl = selector & 3
        frame = [self.get("ss"), rsp, flags, self.get("cs"), rip]
        if vector in ERROR_CODE_VECTORS and error_code is not None:
            frame.append(error_code)
        # 64-bit TSS (SDM Vol. 3, 7.7): RSPn at 4 + 8n, ISTn at 36 + 8(n - 1).
        if ist:
            new_rsp = self._tss64_word(36 + 8 * (ist - 1))
        elif new_cpl < cpl:
            new_rsp = self._tss64_word(4 + 8 * new_cpl)
        else:
            new_rsp = rsp
        sp = ((new_rsp & ~0xF) - 8 * len(frame)) & 0xFFFFFFFFFFFFFFFF
        self.write_linear(sp, struct.pack(f"<{len(frame)}Q",
                                          *(q & 0xFFFFFFFFFFFFFFFF for q in reversed(frame))))
        if new_cpl < cpl:
            # CPL first: Unicorn refuses a ring-0 CS or a null SS while CPL is 3.
            self.exceptions.set_cpl(new_cpl)
            self.set("cs", selector)
            self.set("ss", new_cpl)             # a null SS with RPL = new CPL
        elif cpl:
            self.exceptions.set_cpl(cpl)        # same privilege: back to where it was
        self.set("rsp" if w else "esp", sp)
        new_flags = flags & ~(EFLAGS_TF | EFLAGS_NT | EFLAGS_RF)
        if gate_type == 0xE:
            new_flags &= ~EFLAGS_IF
        self.set("rflags" if w else "eflags", new_flags)
        if selector != self.get("cs"):
            self.set("cs", selector)
        self.set("rip" if w else "eip", offset)

    def _tss64_word(self, offset: int) -> int:
        return int(struct.unpack("<Q", self.read_linear(self._tss_base() + offset, 8))[0])

    # -- fault reports -----------------------------------------------------------------------
    def report(self) -> str:
        """Registers and the disassembled instruction at the current pc (capstone)."""
        lines = []
        try:
            regs = self.registers()
        except Exception as err:  # noqa: BLE001 - a report must never fail
            return f"(registers unavailable: {err})"
        items = list(regs.items())
        width = 16 if self.wide else 8
        for i in range(0, len(items), 4):
            lines.append("  ".join(f"{k.upper():>9}={v:0{width}x}" for k, v in items[i:i + 4]))
        lines.append(self.disassemble_at_pc())
        return "\n".join(lines)

    def disassemble_at_pc(self) -> str:
        # Deferred: capstone loads its native library, and only a fault report needs it.
        import capstone

        if not self.cr0 & CR0_PE:
            mode, cs_base, bits = capstone.CS_MODE_16, self.get("cs") << 4, 16
        elif self.long_mode:
            mode, cs_base, bits = capstone.CS_MODE_64, 0, 64
        else:
            mode, cs_base, bits = capstone.CS_MODE_32, self._segment_base(self.get("cs")), 32
        pc = self.pc
        try:
            code = self.read_linear(cs_base + pc, 15)
        except ValueError:
            return f"  code at {cs_base + pc:#x}: not in guest RAM"
        md = capstone.Cs(capstone.CS_ARCH_X86, mode)
        for insn in md.disasm(code, pc):
            return f"  {bits}-bit code at {cs_base + pc:#x}: {insn.bytes.hex()}  {insn.mnemonic} {insn.op_str}"
        return f"  {bits}-bit code at {cs_base + pc:#x}: {code.hex()} (not a valid instruction)"

    # -- reset / boot entry ------------------------------------------------------------------
    def enter(self, mode: str, regs: dict[str, int], gdt_limit: int = 0, runnable: bool = True) -> None:
        """Put the vCPU in a boot entry state (see :mod:`pyvm.loader`)."""
        if self.cr0 & CR0_PG:
            self.set("cr0", self.cr0 & ~CR0_PG)
        self.uc.msr_write(MSR_EFER, 0)
        self.set("cr4", 0)
        self.set("cr0", 0x10)                       # ET; real mode
        self.uc.reg_write(X.UC_X86_REG_IDTR, (0, 0, 0x3FF, 0))
        self.uc.reg_write(X.UC_X86_REG_GDTR, (0, GDT_ADDR if gdt_limit else 0, gdt_limit or 0xFFFF, 0))
        for name in ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp"):
            self.set(name, 0)
        if mode == "real":
            for name in SEGMENTS:
                self.set(name, regs.get(name, 0))
            # x86's reset state: CS holds a code segment's access byte (QEMU
            # target/i386/cpu.c x86_cpu_reset_hold: P|S|CS|R|A = 0x9b); loading a
            # selector in real mode gives data flags (0x93), as QEMU's helper_ljmp does.
            self.internals.write("cs.flags", REAL_MODE_CS_FLAGS)
        elif mode == "protected":
            self.set("cr0", 0x11)                   # PE | ET
            self.set("cs", 0x08)
            for name in ("ds", "es", "fs", "gs", "ss"):
                self.set(name, 0x10)
        elif mode == "long":
            if not self.wide:
                raise ValueError("long-mode entry needs a 64-bit engine")
            self.set("cr3", PAGE_TABLES)
            self.set("cr4", CR4_PAE)
            self.uc.msr_write(MSR_EFER, 1 << 8)     # LME; LMA follows when paging turns on
            self.set("cr0", 0x80000011)             # PG | ET | PE
            self.set("cs", regs.get("cs", 0x08))
            for name in ("ds", "es", "fs", "gs", "ss"):
                self.set(name, regs.get(name, 0x10))
        else:
            raise ValueError(f"unknown entry mode {mode!r}")
        for name, value in regs.items():
            if name in SEGMENTS:
                continue
            if self.wide and name.startswith("e") and name != "eflags":
                name = "r" + name[1:]
            self.set(name, value)
        self.set("rflags" if self.wide else "eflags", 0x2)
        self.halted = not runnable
        self.pending_exception = None
        self.fault = None

    # -- saved state (pyvm/cpu_state.py) -----------------------------------------------------
    def save_state(self, st: CpuState) -> None:
        """Copy the live registers into the vmsd attributes of ``st``."""
        save_cpu(self, st)

    def load_state(self, st: CpuState) -> None:
        """Apply the vmsd attributes of ``st`` to the engine (after RAM is loaded)."""
        load_cpu(self, st)

    def close(self) -> None:
        if self.native_delivery is not None:
            self.native_delivery.unhook_exceptions()
        if self.port_hooks is not None:
            self.port_hooks.detach()
        for h in self._hooks:
            try:
                self.uc.hook_del(h)
            except uc_mod.UcError:
                pass
        self._hooks = []


def _vmem_translate_fn() -> Any:
    fn = ucmod.uclib.uc_vmem_translate
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.POINTER(ctypes.c_uint64)]
    return fn


_CPUID1: tuple[int, int, int, int] | None = None


def _cpuid_leaf1() -> tuple[int, int, int, int]:
    """Leaf 1 of Unicorn's qemu64 model, asked once of a scratch engine."""
    global _CPUID1
    if _CPUID1 is None:
        scratch = uc_mod.Uc(uc_mod.UC_ARCH_X86, uc_mod.UC_MODE_32)
        scratch.ctl_set_cpu_model(X.UC_CPU_X86_QEMU64)
        scratch.mem_map(0, 0x1000)
        scratch.mem_write(0, b"\x0f\xa2")                # cpuid
        scratch.reg_write(X.UC_X86_REG_EAX, 1)
        scratch.reg_write(X.UC_X86_REG_ECX, 0)
        scratch.emu_start(0, 2)
        _CPUID1 = (scratch.reg_read(X.UC_X86_REG_EAX), scratch.reg_read(X.UC_X86_REG_EBX),
                   scratch.reg_read(X.UC_X86_REG_ECX), scratch.reg_read(X.UC_X86_REG_EDX))
    return _CPUID1
