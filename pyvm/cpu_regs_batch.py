"""A vCPU's public registers read (or written) in one call into Unicorn that keeps the
interpreter lock.

Unicorn's Python binding loads libunicorn with :class:`ctypes.CDLL`: every ``reg_read``,
``msr_read`` or ``reg_write`` lets go of the interpreter lock, and getting it back waits
up to the interpreter's switch interval (5 ms) whenever another thread of the process
wants it.  Saving a vCPU register by register made about eighty such calls, so a
migration's switchover (which saves the vCPUs with the VM stopped) could wait out
several switch intervals.  Here the same library is loaded a second time as a
:class:`ctypes.PyDLL` (calls keep the lock) and a :class:`RegisterBatch` passes every
register of one vCPU to ``uc_reg_read_batch`` (or ``uc_reg_write_batch``) at once.

Unicorn's batch entry points (``uc.c``) call the target's ``reg_read``/``reg_write``
once per id, in order, exactly as ``uc_reg_read``/``uc_reg_write`` do; an MSR
(``UC_X86_REG_MSR`` with a ``uc_x86_msr {rid, value}``) is read by borrowing ECX, EAX
and EDX for QEMU's ``helper_rdmsr`` and putting them back
(``qemu/target/i386/unicorn.c``, ``x86_msr_read``), so MSRs batch like any register.
As with every register access, use a batch on the vCPU's own (run loop) thread only:
an MSR read from another thread while the vCPU runs corrupts the guest's ECX/EAX/EDX.

Every value has a 32-byte slot (the largest, ``uc_x86_mmr``, takes 24); a read first
resets the slots from a template (zeros, and the MSR indexes), so a register Unicorn
writes narrower than 64 bits (the GPRs of a 32-bit engine, FPCW) reads zero-extended,
as :meth:`pyvm.cpu.VCpu.get` gives it.  Layouts: ``include/unicorn/x86.h``.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Any, Sequence

import unicorn as uc_mod
from unicorn import x86_const as X

SLOT = 32

# Kinds of value and their slot layout (little-endian, explicit padding; unicorn/x86.h).
SCALAR = "scalar"       # up to 64 bits
MMR = "mmr"             # uc_x86_mmr {uint16 selector; uint64 base; uint32 limit; uint32 flags}
MSR = "msr"             # uc_x86_msr {uint32 rid; uint64 value}
FP80 = "fp80"           # 64-bit mantissa then 16-bit sign and exponent: 10 raw bytes
XMM = "xmm"             # 128 bits: 16 raw bytes
_FORMAT = {SCALAR: "Q24x", MMR: "H6xQII8x", MSR: "8xQ16x", FP80: "10s22x", XMM: "16s16x"}
_WIDTH = {SCALAR: 1, MMR: 4, MSR: 1, FP80: 1, XMM: 1}


def _python_api_lib() -> Any:
    """libunicorn (the file the binding loaded) with calls that keep the interpreter lock."""
    from unicorn.unicorn_py3 import unicorn as ucmod

    lib = ctypes.PyDLL(ucmod.uclib._name, handle=ucmod.uclib._handle)
    for fn in (lib.uc_reg_read_batch, lib.uc_reg_write_batch):
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        fn.restype = ctypes.c_int
    return lib


_LIB = _python_api_lib()


class Reg:
    """One entry of a batch: a Unicorn register id (or an MSR index) and its kind."""

    __slots__ = ("name", "kind", "rid")

    def __init__(self, name: str, kind: str = SCALAR, msr: int | None = None) -> None:
        self.name = name
        self.kind = kind
        if kind == MSR:
            if msr is None:
                raise ValueError(f"MSR {name!r} needs its index")
            self.rid: int = msr
        else:
            self.rid = int(getattr(X, "UC_X86_REG_" + name.upper()))


class RegisterBatch:
    """A fixed list of registers of one engine, read or written in one native call."""

    def __init__(self, uc: Any, regs: Sequence[Reg]) -> None:
        self._uc = uc                       # the engine must outlive the batch
        self._uch = uc._uch
        self.regs = tuple(regs)
        n = len(self.regs)
        self._n = n
        self._buf = bytearray(SLOT * n)     # exported to ctypes below: never resized
        self._cbuf = (ctypes.c_char * len(self._buf)).from_buffer(self._buf)
        base = ctypes.addressof(self._cbuf)
        self._ids = (ctypes.c_int * n)(*(X.UC_X86_REG_MSR if r.kind == MSR else r.rid
                                         for r in self.regs))
        self._ptrs = (ctypes.c_void_p * n)(*(base + SLOT * i for i in range(n)))
        template = bytearray(SLOT * n)
        for i, r in enumerate(self.regs):
            if r.kind == MSR:
                struct.pack_into("<I", template, SLOT * i, r.rid)
        self._template = bytes(template)
        self._struct = struct.Struct("<" + "".join(_FORMAT[r.kind] for r in self.regs))
        # Where each register's value starts in the unpacked tuple.
        self._index: dict[str, int] = {}
        k = 0
        for r in self.regs:
            self._index[r.name] = k
            k += _WIDTH[r.kind]

    def read(self) -> dict[str, Any]:
        """Every register by name: an int; ``(selector, base, limit, flags)`` for an MMR;
        the raw little-endian bytes for FP80 (10) and XMM (16)."""
        self._buf[:] = self._template
        err = _LIB.uc_reg_read_batch(self._uch, self._ids, self._ptrs, self._n)
        if err:
            raise uc_mod.UcError(err)
        values = self._struct.unpack_from(self._buf)
        out: dict[str, Any] = {}
        for r in self.regs:
            k = self._index[r.name]
            out[r.name] = values[k:k + 4] if r.kind == MMR else values[k]
        return out

    def write(self, values: dict[str, Any]) -> None:
        """Write every register of the batch, in the batch's order (``values`` as
        :meth:`read` gives them).  On an error Unicorn stops at the register it refused,
        and says not which: the caller finds it by writing one at a time."""
        flat: list[Any] = []
        for r in self.regs:
            v = values[r.name]
            if r.kind == MMR:
                flat.extend(v)
            elif r.kind == SCALAR or r.kind == MSR:
                flat.append(v & 0xFFFFFFFFFFFFFFFF)
            else:
                flat.append(bytes(v))
        self._struct.pack_into(self._buf, 0, *flat)
        for i, r in enumerate(self.regs):
            if r.kind == MSR:
                struct.pack_into("<I", self._buf, SLOT * i, r.rid)
        err = _LIB.uc_reg_write_batch(self._uch, self._ids, self._ptrs, self._n)
        if err:
            raise uc_mod.UcError(err)
