"""The one module that knows Unicorn's saved x86 CPU context.

Unicorn's API reads and writes most of the CPU, but not all of it: the hidden part of
CS/DS/ES/FS/GS/SS (base, limit, attributes), QEMU's ``hflags`` (CPL, CS32/SS32, the
interrupt shadow) and the TSC offset have no register id, WRMSR cannot clear EFER.LMA,
and a 32-bit engine shows neither the upper halves of the GPRs and RIP nor R8-R15 and
XMM8-15 (it may be running long mode).  For those pyvm reads and writes
the engine's saved context: ``uc_context_save`` copies QEMU's ``CPUX86State`` (up to
``end_reset_fields``) into a context, pyvm edits bytes in it, ``uc_context_restore``
copies it back.

No offset in here is written down.  At first use a **calibration probe** runs on a scratch
engine: it writes distinctive values through the public API (segment registers in real and
protected mode, CR0, EFER, DR7, and on a 64-bit scratch engine the GPRs, RIP and XMM8-15),
saves the context after each write and finds where
each value landed; the TSC offset, which no register writes, is found by behaviour (a
candidate word is set and ``rdtsc`` must move by exactly that much).  Unicorn is pinned in
pyproject.toml to the version calibrated here; when a probe fails (another Unicorn moved
things) :class:`CalibrationError` names the version found and the field that failed.

Extending: a probe is a function ``probe(lab: ProbeLab) -> list[ContextField]`` added
with :func:`register_probe`; it may use fields found by earlier probes through
``lab.found``.  :class:`ContextAccess` then reads and writes the new field by name.

Nothing else in pyvm may touch Unicorn internals; everything goes through
:class:`ContextAccess`, except the TLB fill and TLB tables of dirty tracking, which
:mod:`pyvm.unicorn_tlb` finds the same way (by probing) for ``pyvm/_tlbtrack.pyx``.  Layout reference: QEMU ``target/i386/cpu.h`` (``CPUX86State``,
``SegmentCache``, the ``HF_*`` bits), Unicorn ``qemu/target/i386/unicorn.c``
(``cpu_context_size``) and ``uc.c`` (``uc_context_save``/``uc_context_restore``).
"""

from __future__ import annotations

import ctypes
import struct
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import unicorn as uc_mod
from unicorn import x86_const as X

from pyvm.errors import PyvmError

# The Unicorn release these probes were written against (pyproject.toml pins it).
CALIBRATED_UNICORN = "2.1.4"

SEGMENT_NAMES = ("es", "cs", "ss", "ds", "fs", "gs")     # QEMU's R_ES..R_GS order
SEGMENT_PARTS = ("selector", "base", "limit", "flags")

# QEMU target/i386/cpu.h: hflags bits pyvm reads.
HF_CPL_MASK = 0x3           # HF_CPL_SHIFT 0
HF_INHIBIT_IRQ_MASK = 1 << 3
HF_CS32_MASK = 1 << 4
HF_SS32_MASK = 1 << 5
HF_ADDSEG_MASK = 1 << 6
HF_PE_MASK = 1 << 7
HF_LMA_MASK = 1 << 14
HF_CS64_MASK = 1 << 15

# Descriptor attribute bits as QEMU keeps them in SegmentCache.flags (target/i386/cpu.h).
DESC_A_MASK = 1 << 8
DESC_W_MASK = 1 << 9
DESC_S_MASK = 1 << 12
DESC_P_MASK = 1 << 15


class CalibrationError(PyvmError):
    """The probe could not find a field: this Unicorn is not the one pyvm was calibrated on.
    Raised when the first vCPU is created, so pyvm stops at start-up with this one line."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(
            f"cannot locate {field} in Unicorn's saved CPU context ({detail}); pyvm needs "
            f"unicorn=={CALIBRATED_UNICORN} (installed: {installed_unicorn_version()})")
        self.field = field


def installed_unicorn_version() -> str:
    return str(getattr(uc_mod, "__version__", "unknown"))


@dataclass(frozen=True)
class ContextField:
    """A little-endian unsigned field at ``offset`` (from the context's start), ``size`` bytes."""

    name: str
    offset: int
    size: int

    def decode(self, blob: bytes | bytearray | memoryview) -> int:
        return int.from_bytes(blob[self.offset:self.offset + self.size], "little")

    def encode_into(self, blob: bytearray, value: int) -> None:
        mask = (1 << (8 * self.size)) - 1
        blob[self.offset:self.offset + self.size] = (value & mask).to_bytes(self.size, "little")


@dataclass(frozen=True)
class Layout:
    """Where every calibrated field lives in a context of ``context_size`` bytes."""

    context_size: int
    fields: dict[str, ContextField]

    def __getitem__(self, name: str) -> ContextField:
        try:
            return self.fields[name]
        except KeyError:
            raise KeyError(f"no calibrated Unicorn context field {name!r}") from None


# -- the raw C entry points -------------------------------------------------------------------
def _lib() -> Any:
    from unicorn.unicorn_py3 import unicorn as ucmod

    # Our own function objects over the loaded library: argtypes set here cannot change
    # how the binding calls the same functions.  PyDLL: these calls keep the interpreter
    # lock (a CDLL call lets go of it, and taking it back can wait out the 5 ms switch
    # interval when another thread is runnable; they run on the vCPU loop, also in a
    # migration's downtime).  None of them blocks or calls back into Python.
    lib = ctypes.PyDLL(ucmod.uclib._name, handle=ucmod.uclib._handle)
    lib.uc_context_alloc.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
    lib.uc_context_alloc.restype = ctypes.c_int
    lib.uc_context_save.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.uc_context_save.restype = ctypes.c_int
    lib.uc_context_restore.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.uc_context_restore.restype = ctypes.c_int
    lib.uc_context_size.argtypes = [ctypes.c_void_p]
    lib.uc_context_size.restype = ctypes.c_size_t
    lib.uc_context_free.argtypes = [ctypes.c_void_p]
    lib.uc_context_free.restype = ctypes.c_int
    lib.uc_emu_start.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64,
                                 ctypes.c_uint64, ctypes.c_size_t]
    lib.uc_emu_start.restype = ctypes.c_int
    lib.uc_reg_read.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    lib.uc_reg_read.restype = ctypes.c_int
    return lib


_LIB = _lib()


def _check(err: int) -> None:
    if err:
        raise uc_mod.UcError(err)


class _RawContext:
    """One ``uc_context`` of an engine, read and written as bytes."""

    def __init__(self, uc: Any) -> None:
        self._uch = uc._uch
        self.size = int(_LIB.uc_context_size(self._uch))
        ptr = ctypes.c_void_p()
        _check(_LIB.uc_context_alloc(self._uch, ctypes.byref(ptr)))
        self._ptr = ptr
        self._uc = uc           # the engine must outlive its context
        # The context's bytes, copied with the interpreter lock held (ctypes.memmove is
        # a foreign call that lets go of it).
        self._view = memoryview((ctypes.c_char * self.size).from_address(ptr.value or 0)).cast("B")

    def save(self) -> bytearray:
        _check(_LIB.uc_context_save(self._uch, self._ptr))
        return bytearray(self._view)

    def restore(self, blob: bytes | bytearray) -> None:
        if len(blob) != self.size:
            raise ValueError("context blob of the wrong size")
        self._view[:] = blob
        _check(_LIB.uc_context_restore(self._uch, self._ptr))

    def free(self) -> None:
        self._view.release()
        if self._ptr.value:
            _LIB.uc_context_free(self._ptr)
            self._ptr = ctypes.c_void_p()

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class NativeContext:
    """A context of one engine for the native delivery (pyvm/_delivery.pyx): its address
    and the addresses of the save/restore entry points; field offsets come from
    :func:`calibrate`.  Freed with this object."""

    def __init__(self, uc: Any) -> None:
        self._raw = _RawContext(uc)
        self.address = int(self._raw._ptr.value or 0)
        self.save_fn = int(ctypes.cast(_LIB.uc_context_save, ctypes.c_void_p).value or 0)
        self.restore_fn = int(ctypes.cast(_LIB.uc_context_restore, ctypes.c_void_p).value or 0)


# -- calibration ----------------------------------------------------------------------------------
PROBE_RAM = 0x10000         # scratch engine RAM: code at 0x0, a GDT at GDT_AT
_GDT_AT = 0x1000


def _words(blob: bytearray, size: int) -> Any:
    """The blob as little-endian unsigned words of ``size`` bytes (tail dropped)."""
    n = len(blob) // size
    return np.frombuffer(bytes(blob[:n * size]), dtype=f"<u{size}")


class ProbeLab:
    """What a probe works with: a scratch engine, context snapshots, and the search helpers."""

    def __init__(self, mode: int, ram: bool = True) -> None:
        self.mode = mode
        self.found: dict[str, ContextField] = {}
        self.uc = self.fresh_engine(ram)
        self.ctx = _RawContext(self.uc)

    def fresh_engine(self, ram: bool = True) -> Any:
        uc = uc_mod.Uc(uc_mod.UC_ARCH_X86, self.mode)
        uc.ctl_set_cpu_model(X.UC_CPU_X86_QEMU64)
        if ram:
            uc.mem_map(0, PROBE_RAM)
        return uc

    def snapshot(self) -> bytearray:
        return self.ctx.save()

    def locate(self, name: str, size: int, apply: Callable[[int], None],
               values: Sequence[int], expect: Callable[[int], int] | None = None,
               window: tuple[int, int] | None = None) -> ContextField:
        """The one ``size``-aligned offset that holds ``expect(v)`` after ``apply(v)``, for every v."""
        expect = expect or (lambda v: v)
        lo, hi = window or (0, self.ctx.size)
        candidates: set[int] | None = None
        for v in values:
            apply(v)
            words = _words(self.snapshot(), size)
            want = expect(v) & ((1 << (8 * size)) - 1)
            here = {int(i) * size for i in np.flatnonzero(words == want)
                    if lo <= int(i) * size < hi}
            candidates = here if candidates is None else candidates & here
            if not candidates:
                break
        return self._one(name, size, candidates or set())

    def locate_delta(self, name: str, size: int, apply: Callable[[int], None],
                     values: Sequence[int], delta: Callable[[int], int]) -> ContextField:
        """The one offset whose value XOR its value after ``apply(values[0])`` is ``delta(v)``."""
        apply(values[0])
        base = _words(self.snapshot(), size)
        candidates: set[int] | None = None
        for v in values[1:]:
            apply(v)
            words = _words(self.snapshot(), size)
            here = {int(i) * size for i in np.flatnonzero((words ^ base) == delta(v))}
            candidates = here if candidates is None else candidates & here
            if not candidates:
                break
        return self._one(name, size, candidates or set())

    def _one(self, name: str, size: int, candidates: set[int]) -> ContextField:
        if len(candidates) != 1:
            raise CalibrationError(name, f"{len(candidates)} candidate offsets")
        f = ContextField(name, candidates.pop(), size)
        self.found[name] = f
        return f

    def write_gdt(self, descriptors: Iterable[int]) -> None:
        """Put raw 8-byte descriptors at GDT index 1.. and point GDTR at them."""
        table = b"\0" * 8 + b"".join(struct.pack("<Q", d) for d in descriptors)
        self.uc.mem_write(_GDT_AT, table)
        self.uc.reg_write(X.UC_X86_REG_GDTR, (0, _GDT_AT, len(table) - 1, 0))


Probe = Callable[[ProbeLab], list[ContextField]]
_PROBES: list[tuple[str, Probe]] = []
_LAYOUT: Layout | None = None
_LAYOUT_LOCK = threading.Lock()


def register_probe(name: str, probe: Probe) -> None:
    """Add a probe (run in registration order); call before the first calibration."""
    if any(n == name for n, _ in _PROBES):
        raise ValueError(f"probe {name!r} registered twice")
    global _LAYOUT
    _PROBES.append((name, probe))
    _LAYOUT = None


def _descriptor(base: int, limit: int, access: int, flags4: int) -> int:
    """An 8-byte segment descriptor (SDM Vol. 3, 3.4.5)."""
    return ((limit & 0xFFFF) | ((base & 0xFFFFFF) << 16) | ((access & 0xFF) << 40)
            | (((limit >> 16) & 0xF) << 48) | ((flags4 & 0xF) << 52) | (((base >> 24) & 0xFF) << 56))


def _probe_segments(lab: ProbeLab) -> list[ContextField]:
    """SegmentCache {selector, base, limit, flags} of ES..GS (QEMU target/i386/cpu.h)."""
    uc = lab.uc
    uc.reg_write(X.UC_X86_REG_CR0, 0x10)        # real mode, whatever the engine starts in
    uc.msr_write(0xC0000080, 0)                 # EFER
    # Real mode: a selector write loads base = selector << 4 (Unicorn load_seg_16_helper).
    for seg in SEGMENT_NAMES:
        rid = getattr(X, "UC_X86_REG_" + seg.upper())

        def put(v: int, rid: int = rid) -> None:
            uc.reg_write(rid, v)
        values = (0x1234, 0x2A5B, 0x3C6D)
        lab.locate(f"{seg}.selector", 4, put, values)
        lab.locate(f"{seg}.base", 8, put, values, expect=lambda v: v << 4)
    # Protected mode: DS loaded from descriptors with distinctive base, limit and attributes.
    bases = (0x00ABCDE0, 0x12345600, 0x7654A000)
    limits = (0x0_5A5A, 0x0_A5A5, 0xC_3C3C)
    access = (0x93, 0xB3, 0xD3)          # present data, read/write, accessed; DPL 0, 1, 2
    avl = (0x1, 0x0, 0x1)
    lab.write_gdt(_descriptor(b, lim, a, f) for b, lim, a, f in zip(bases, limits, access, avl))
    uc.reg_write(X.UC_X86_REG_CR0, 0x11)
    ds_sel = lab.found["ds.selector"].offset
    window = (ds_sel, ds_sel + 64)

    def load_ds(i: int) -> None:
        uc.reg_write(X.UC_X86_REG_DS, 8 * (i + 1))
    idx = (0, 1, 2)
    lim = lab.locate("ds.limit", 4, load_ds, idx, expect=lambda i: limits[i], window=window)
    flg = lab.locate("ds.flags", 4, load_ds, idx,
                     expect=lambda i: (_descriptor(bases[i], limits[i], access[i], avl[i]) >> 32)
                     | DESC_A_MASK, window=window)
    base = lab.locate("ds.base", 8, load_ds, idx, expect=lambda i: bases[i], window=window)
    if base.offset != lab.found["ds.selector"].offset + (lab.found["es.base"].offset
                                                         - lab.found["es.selector"].offset):
        raise CalibrationError("ds.base", "protected and real mode disagree")
    uc.reg_write(X.UC_X86_REG_CR0, 0x10)
    for seg in SEGMENT_NAMES:
        uc.reg_write(getattr(X, "UC_X86_REG_" + seg.upper()), 0x1234)
    rel_limit, rel_flags = lim.offset - ds_sel, flg.offset - ds_sel
    # One struct for all six: check its limit and attributes where real mode put them.
    blob = lab.snapshot()
    for seg in SEGMENT_NAMES:
        sel = lab.found[f"{seg}.selector"].offset
        for part, rel, want in (("limit", rel_limit, 0xFFFF),
                                ("flags", rel_flags, DESC_P_MASK | DESC_S_MASK | DESC_W_MASK
                                 | DESC_A_MASK)):
            f = ContextField(f"{seg}.{part}", sel + rel, 4)
            if f.decode(blob) & 0xFFFF != want & 0xFFFF:
                raise CalibrationError(f.name, "real-mode value not where the DS layout puts it")
            if seg == "ds":
                if f != lab.found[f.name]:
                    raise CalibrationError(f.name, "protected and real mode disagree")
            else:
                lab.found[f.name] = f
    return [lab.found[f"{seg}.{part}"] for seg in SEGMENT_NAMES for part in SEGMENT_PARTS]


def _probe_hflags(lab: ProbeLab) -> list[ContextField]:
    """hflags: CR0.MP/EM/TS are mirrored at HF_MP/EM/TS (bits 9-11, QEMU cpu_x86_update_cr0)."""
    def put(cr0: int) -> None:
        lab.uc.reg_write(X.UC_X86_REG_CR0, 0x10 | cr0)
    f = lab.locate_delta("hflags", 4, put, (0x0, 0x2, 0x4, 0x8, 0xE), delta=lambda v: v << 8)
    lab.uc.reg_write(X.UC_X86_REG_CR0, 0x10)
    return [f]


def _probe_efer(lab: ProbeLab) -> list[ContextField]:
    """efer: WRMSR cannot clear LMA (QEMU helper_wrmsr's update_mask), so loads write it here."""
    def put(v: int) -> None:
        lab.uc.msr_write(0xC0000080, v)
    f = lab.locate_delta("efer", 8, put, (0x0, 0x1, 0x100, 0x101), delta=lambda v: v)
    lab.uc.msr_write(0xC0000080, 0)
    return [f]


def _probe_dr(lab: ProbeLab) -> list[ContextField]:
    """dr[7]: the anchor for the TSC-offset search (it has a public register id)."""
    def put(v: int) -> None:
        lab.uc.reg_write(X.UC_X86_REG_DR7, v)
    f = lab.locate("dr7", 8, put, (0x5A5A0400, 0x3C3C0400, 0x0F0F0400))
    lab.uc.reg_write(X.UC_X86_REG_DR7, 0x400)
    return [f]


WIDE_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


def _probe_wide_registers(lab: ProbeLab) -> list[ContextField]:
    """RAX-R15, RIP and XMM8-15 as a 64-bit engine writes them.  A 32-bit engine running
    long mode holds them too, but its register API shows only the low halves of the
    GPRs and RIP and no R8-R15 or XMM8-15."""
    wide = ProbeLab(uc_mod.UC_MODE_64, ram=False)
    try:
        out = []
        for i, name in enumerate(WIDE_GPRS + ("rip",)):
            rid = getattr(X, "UC_X86_REG_" + name.upper())

            def put(v: int, rid: int = rid) -> None:
                wide.uc.reg_write(rid, v)
            out.append(wide.locate(name, 8, put, [(0x5A17 + i) << 40 | k << 8 | 0x3C
                                                   for k in (1, 2, 3)]))
        for i in range(8, 16):
            rid = getattr(X, f"UC_X86_REG_XMM{i}")

            def put_xmm(v: int, rid: int = rid) -> None:
                wide.uc.reg_write(rid, (0x6B00 + v) << 64 | v)
            low = wide.locate(f"xmm{i}.low", 8, put_xmm, [(0x71C0 + i) << 32 | k for k in (1, 2)])
            f = ContextField(f"xmm{i}", low.offset, 16)
            if f.decode(wide.snapshot()) >> 64 != 0x6B00 + ((0x71C0 + i) << 32 | 2):
                raise CalibrationError(f.name, "the high half does not follow the low half")
            out.append(f)
        return out
    finally:
        wide.ctx.free()


_TSC_MARK = 1 << 60
_TSC_WINDOW = 256           # bytes after dr[7] searched (QEMU keeps tsc_offset just after dr[])


def _probe_tsc_offset(lab: ProbeLab) -> list[ContextField]:
    """tsc_offset: the word that ``rdtsc`` adds (QEMU target/i386/misc_helper.c helper_rdtsc)."""
    uc, ctx = lab.uc, lab.ctx
    uc.mem_write(0, b"\x0f\x31")            # rdtsc (CR4.TSD = 0: allowed in any mode)
    uc.reg_write(X.UC_X86_REG_CR0, 0x10)
    uc.reg_write(X.UC_X86_REG_CS, 0)

    def rdtsc() -> int:
        uc.reg_write(X.UC_X86_REG_EIP, 0)
        uc.emu_start(0, 2)
        return int((uc.reg_read(X.UC_X86_REG_EDX) << 32) | uc.reg_read(X.UC_X86_REG_EAX))
    base = ctx.save()
    anchor = lab.found["dr7"].offset + 8
    for off in range(anchor, min(anchor + _TSC_WINDOW, ctx.size - 8), 8):
        if any(base[off:off + 8]):
            continue
        trial = bytearray(base)
        trial[off:off + 8] = _TSC_MARK.to_bytes(8, "little")
        ctx.restore(trial)
        marked = rdtsc()
        ctx.restore(base)
        plain = rdtsc()
        # marked was read first: marked - plain = MARK minus the ticks between the reads.
        if _TSC_MARK - (1 << 40) < marked - plain <= _TSC_MARK:
            return [ContextField("tsc_offset", off, 8)]
    raise CalibrationError("tsc_offset", "no word after dr[7] moves rdtsc")


def _probe_control_registers(lab: ProbeLab) -> list[ContextField]:
    """cr[0], cr[3], cr[4]: the TLB write tracker's own page walk reads them in place
    (pyvm/_tlbtrack.pyx)."""
    def cr(reg: int, base: int) -> Callable[[int], None]:
        return lambda v: lab.uc.reg_write(reg, base | v)
    def now(reg: int) -> Callable[[int], int]:
        return lambda _v: int(lab.uc.reg_read(reg))      # the value as the CPU took it
    found = [lab.locate(name, 8, cr(reg, base), values, expect=now(reg))
             for name, reg, base, values in (
                 ("cr3", X.UC_X86_REG_CR3, 0, (0x5A5000, 0x3C3000, 0x0F0000)),
                 ("cr4", X.UC_X86_REG_CR4, 0, (0x200, 0x600, 0x10)),
                 ("cr0", X.UC_X86_REG_CR0, 0x10, (0x0, 0x20, 0x40000000)))]
    for reg, value in ((X.UC_X86_REG_CR3, 0), (X.UC_X86_REG_CR4, 0), (X.UC_X86_REG_CR0, 0x10)):
        lab.uc.reg_write(reg, value)
    return found


for _name, _probe in (("segments", _probe_segments), ("hflags", _probe_hflags),
                      ("efer", _probe_efer), ("wide_registers", _probe_wide_registers),
                      ("dr7", _probe_dr), ("tsc_offset", _probe_tsc_offset),
                      ("control_registers", _probe_control_registers)):
    register_probe(_name, _probe)



def calibrate() -> Layout:
    """Where the fields are (probed once per process on a scratch 32-bit engine).

    A 64-bit engine saves the same ``CPUX86State`` (Unicorn builds one x86-64 target for
    every mode); :class:`ContextAccess` checks the context sizes agree.
    """
    global _LAYOUT
    with _LAYOUT_LOCK:
        if _LAYOUT is not None:
            return _LAYOUT
        try:
            lab = ProbeLab(uc_mod.UC_MODE_32)
        except uc_mod.UcError as err:
            raise CalibrationError("the context", f"scratch engine: {err}") from err
        fields: dict[str, ContextField] = {}
        try:
            for name, probe in _PROBES:
                try:
                    got = probe(lab)
                except uc_mod.UcError as err:
                    raise CalibrationError(name, f"probe failed: {err}") from err
                for f in got:
                    fields[f.name] = f
                    lab.found[f.name] = f
            _LAYOUT = Layout(lab.ctx.size, fields)
        finally:
            lab.ctx.free()
        return _LAYOUT


class ContextAccess:
    """Named fields of one live engine's CPU context.  Use on the vCPU thread only."""

    def __init__(self, uc: Any) -> None:
        self.layout = calibrate()
        self._ctx = _RawContext(uc)
        if self._ctx.size != self.layout.context_size:
            raise CalibrationError("the context", f"size {self._ctx.size}, calibrated "
                                   f"{self.layout.context_size}")
        # The TSC's scratch engine now, with the vCPU: made at the first TSC read, it was
        # made in a migration's downtime (the vCPU save), and a new engine took 1 to 15 ms.
        host_ticks()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.layout.fields)

    def read(self, name: str) -> int:
        return self.layout[name].decode(self._ctx.save())

    def read_many(self, names: Iterable[str]) -> dict[str, int]:
        blob = self._ctx.save()
        return {n: self.layout[n].decode(blob) for n in names}

    def write(self, name: str, value: int) -> None:
        self.write_many({name: value})

    def write_many(self, values: dict[str, int]) -> None:
        """One save, every field edited, one restore."""
        fields = [(self.layout[n], v) for n, v in values.items()]
        blob = self._ctx.save()
        for f, v in fields:
            f.encode_into(blob, v)
        self._ctx.restore(blob)

    def read_tsc(self) -> int:
        """The guest's TSC now (what rdtsc would return)."""
        return (host_ticks() + self.read("tsc_offset")) & 0xFFFFFFFFFFFFFFFF

    def write_tsc(self, value: int) -> None:
        """Make the guest's TSC read ``value`` now and count on from there."""
        self.write("tsc_offset", (value - host_ticks()) & 0xFFFFFFFFFFFFFFFF)

    def close(self) -> None:
        self._ctx.free()


# -- the TSC ------------------------------------------------------------------------------------
# Unicorn's rdtsc returns the host's cycle counter plus env->tsc_offset (hw/i386/x86.c
# cpu_get_tsc -> cpu_get_host_ticks); no register or MSR writes it (MSR 0x10 writes go to
# env->tsc, which rdtsc never reads).  A scratch engine with offset 0 reads that counter.
_CLOCK_LOCK = threading.Lock()
_CLOCK: Any = None


def host_ticks() -> int:
    """The counter Unicorn's rdtsc adds ``tsc_offset`` to, read now."""
    global _CLOCK
    with _CLOCK_LOCK:
        if _CLOCK is None:
            uc = uc_mod.Uc(uc_mod.UC_ARCH_X86, uc_mod.UC_MODE_32)
            uc.mem_map(0, 0x1000)
            uc.mem_write(0, b"\x0f\x31")                    # rdtsc
            uc.reg_write(X.UC_X86_REG_CR0, 0x10)
            uc.reg_write(X.UC_X86_REG_CS, 0)
            _CLOCK = uc
        uc = _CLOCK
        # Straight through the PyDLL entry points: the binding's emu_start and reg_read
        # let go of the interpreter lock (this runs in a migration's downtime).
        _check(_LIB.uc_emu_start(uc._uch, 0, 2, 0, 0))
        eax, edx = ctypes.c_uint64(0), ctypes.c_uint64(0)
        _check(_LIB.uc_reg_read(uc._uch, X.UC_X86_REG_EAX, ctypes.byref(eax)))
        _check(_LIB.uc_reg_read(uc._uch, X.UC_X86_REG_EDX, ctypes.byref(edx)))
        return (edx.value << 32) | eax.value


# ================================================================================================
# Interrupt and exception delivery (pyvm.cpu): exceptions in flight, error codes, the CPL.
# ================================================================================================
# Unicorn never runs QEMU's do_interrupt, which is what resets ``old_exception`` (QEMU
# target/i386/seg_helper.c, do_interrupt_all): left alone, the second exception a guest
# takes is promoted to #DF and the third to a triple fault (excp_helper.c,
# check_exception).  ``error_code`` is set by raise_interrupt2 and read by pyvm inside the
# interrupt hook; ``exception_is_int`` tells ``int n`` (no error code pushed) from a fault.
OLD_EXCEPTION_NONE = 0xFFFFFFFF     # -1 as the int QEMU keeps (x86_cpu_reset)

_EXC_CODE = 0x100                   # where the probe's code goes in the scratch engine
_EXC_GP_SELECTORS = (0x0F38, 0x1A50, 0x2468)   # beyond the GDT limit: #GP(selector)


def _probe_exceptions(lab: ProbeLab) -> list[ContextField]:
    """old_exception, error_code, exception_is_int (QEMU target/i386/cpu.h, CPUX86State)."""
    uc, ctx = lab.uc, lab.ctx
    lab.write_gdt([_descriptor(0, 0xFFFFF, 0x9B, 0xC), _descriptor(0, 0xFFFFF, 0x93, 0xC)])
    uc.reg_write(X.UC_X86_REG_CR0, 0x11)
    uc.reg_write(X.UC_X86_REG_CS, 0x08)
    for seg in (X.UC_X86_REG_SS, X.UC_X86_REG_DS, X.UC_X86_REG_ES):
        uc.reg_write(seg, 0x10)
    uc.reg_write(X.UC_X86_REG_ESP, 0x8000)
    seen: list[tuple[int, bytearray]] = []

    def on_intr(uc_: Any, intno: int, _ud: Any) -> None:
        seen.append((intno, ctx.save()))
        uc_.emu_stop()
    hook = uc.hook_add(uc_mod.UC_HOOK_INTR, on_intr)
    base = ctx.save()

    def trial(code: bytes, want: int) -> bytearray:
        ctx.restore(base)
        seen.clear()
        uc.mem_write(_EXC_CODE, code)
        try:
            uc.emu_start(_EXC_CODE, _EXC_CODE + len(code))
        except uc_mod.UcError:
            pass
        if len(seen) != 1 or seen[0][0] != want:
            raise CalibrationError("exception state", f"probe expected vector {want}, "
                                   f"hook saw {[v for v, _ in seen]}")
        return seen[0][1]
    try:
        gp = [trial(b"\x66\xb8" + struct.pack("<H", s) + b"\x8e\xd8", 13)   # mov ax,s; mov ds,ax
              for s in _EXC_GP_SELECTORS]
        de = trial(b"\x31\xc9\xf7\xf1", 0)                                 # xor ecx,ecx; div ecx
        sw = trial(b"\xcd\x21", 0x21)                                      # int 0x21
    finally:
        uc.hook_del(hook)
        ctx.restore(base)
        uc.reg_write(X.UC_X86_REG_CR0, 0x10)
    b0, g, d, s = (_words(x, 4) for x in (base, gp[0], de, sw))
    err = np.ones(len(b0), dtype=bool)
    for blob, sel in zip(gp, _EXC_GP_SELECTORS):
        err &= _words(blob, 4) == sel
    old = (b0 == OLD_EXCEPTION_NONE) & (g == 13) & (d == 0) & (s == OLD_EXCEPTION_NONE)
    found = [lab._one("error_code", 4, {int(i) * 4 for i in np.flatnonzero(err)}),
             lab._one("old_exception", 4, {int(i) * 4 for i in np.flatnonzero(old)})]
    # exception_is_int follows error_code in CPUX86State: 1 after ``int n``, 0 after a fault.
    near = found[0].offset // 4
    is_int = {(near + k) * 4 for k in range(1, 4)
              if s[near + k] == 1 and g[near + k] == 0 and d[near + k] == 0}
    found.append(lab._one("exception_is_int", 4, is_int))
    return found


register_probe("exceptions", _probe_exceptions)


class ExceptionState:
    """The exception bookkeeping of one live engine (pyvm.cpu, vCPU thread only)."""

    def __init__(self, access: ContextAccess) -> None:
        self._access = access

    def in_hook(self) -> tuple[int, bool]:
        """(error code, raised by ``int n``) of the exception being hooked now."""
        got = self._access.read_many(("error_code", "exception_is_int"))
        return got["error_code"], bool(got["exception_is_int"])

    def clear_in_flight(self) -> None:
        """No exception in flight: what delivering one leaves behind on real hardware."""
        self._access.write("old_exception", OLD_EXCEPTION_NONE)

    def set_cpl(self, cpl: int) -> None:
        """Current privilege level (hflags bits 0-1), which Unicorn only changes itself on
        loading SS and on iret/sysret: needed to switch from ring 3 to ring 0 on delivery."""
        flags = self._access.read("hflags")
        self._access.write("hflags", (flags & ~HF_CPL_MASK) | (cpl & HF_CPL_MASK))

    def cpl(self) -> int:
        return self._access.read("hflags") & HF_CPL_MASK
