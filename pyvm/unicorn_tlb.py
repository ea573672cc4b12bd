"""Where an x86 Unicorn engine keeps its TLB-fill function and its TLB, found by probing.

pyvm's TLB write tracker (:mod:`pyvm.tlb_tracking`, native part ``pyvm/_tlbtrack.pyx``)
puts its own function in front of Unicorn's x86 TLB fill, so it needs four places inside
an engine that no API names:

- the engine's ``CPUState`` (``uc_struct.cpu``, Unicorn ``include/uc_priv.h``);
- the fill function pointer the softmmu calls (``CPUClass.tlb_fill``, reached through
  ``CPUState.cc``; Unicorn's ``uc_set_tlb`` in ``qemu/unicorn_common.h`` switches it
  between ``x86_cpu_tlb_fill`` and ``unicorn_fill_tlb``);
- ``CPUX86State`` inside the ``X86CPU`` (what ``uc_context_save`` copies);
- the fast TLB tables ``CPUTLBDescFast f[NB_MMU_MODES]`` (``{mask, table}`` pairs,
  QEMU ``include/exec/cpu-defs.h``), which QEMU places just before ``CPUX86State``,
  and the size of a ``CPUTLBEntry``, whose ``addr_write`` the tracker clears and whose
  ``paddr`` (a Unicorn addition) it reads.

None of these offsets is written down here.  :func:`tlb_layout` finds them by behaviour
on a scratch engine, as :mod:`pyvm.unicorn_internals` finds the context's fields:

1. distinctive values go into the sixteen GPRs; the engine's context (a copy of
   ``CPUX86State``) is saved; every pointer in the engine's ``uc_struct`` is followed and
   the one whose object holds those sixteen words is the CPU, and where it holds them
   is ``CPUX86State``;
2. among the pointers in the CPU before ``CPUX86State``, the one to an object holding
   the address of ``x86_cpu_tlb_fill`` is ``cc``, and the word that turns into
   ``unicorn_fill_tlb`` when the engine is switched to ``UC_TLB_VIRTUAL`` (and back
   when switched to ``UC_TLB_CPU``) is ``tlb_fill``;
3. a guest load from a known page is run; the ``{mask, table}`` pair just before
   ``CPUX86State`` whose entry for that page reads back the page's virtual address,
   physical address and host address (from the engine's RAM, mapped at a host address
   pyvm chose) is the kernel-mode table ``f[MMU_KNOSMAP_IDX]`` (QEMU
   ``target/i386/cpu.h``: ``MMU_KSMAP_IDX`` 0, ``MMU_USER_IDX`` 1, ``MMU_KNOSMAP_IDX`` 2).

Memory is read through ``/proc/self/mem``, so following a pointer that is not one
returns an error instead of faulting.  Unicorn is pinned (pyproject.toml); when a probe
fails, :class:`pyvm.unicorn_internals.CalibrationError` names the step, and pyvm falls
back to host write-protect.  :meth:`TlbLayout.check` verifies the layout on every engine
it is used on.
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading
from dataclasses import dataclass
from typing import Any

import unicorn as uc_mod
from unicorn import unicorn_const as UC
from unicorn import x86_const as X

from pyvm.unicorn_internals import CalibrationError, installed_unicorn_version

MMU_KNOSMAP_IDX = 2          # QEMU target/i386/cpu.h
NB_MMU_MODES = 3
_DESC_FAST = 16              # sizeof(CPUTLBDescFast): {uintptr_t mask; CPUTLBEntry *table}
_PROBE_PAGE = 0x5000         # the page the probe's guest loads from
_PROBE_RAM = 0x10000
_SCAN_UC = 0x4000            # bytes of uc_struct searched for the CPU pointer
_SCAN_CPU = 0x80000          # bytes of the CPU searched for CPUX86State
_SCAN_CLASS = 0x800          # bytes of CPUClass searched for tlb_fill
_SCAN_TLB = 0x400            # bytes before CPUX86State searched for f[]



@dataclass(frozen=True)
class TlbLayout:
    """Offsets in bytes: ``cpu_off`` in ``uc_struct``; ``cc_off``, ``env_off`` and
    ``tlbf_off`` (of ``f[0]``) in the CPU; ``fill_off`` in ``CPUClass``; a TLB entry is
    ``1 << entry_bits`` bytes.  ``fill_cpu`` is the address of Unicorn's x86 fill;
    a saved context holds ``CPUX86State`` from byte ``context_header`` on."""

    cpu_off: int
    cc_off: int
    fill_off: int
    env_off: int
    tlbf_off: int
    entry_bits: int
    fill_cpu: int
    context_header: int

    def cpu_of(self, uc: Any) -> int:
        """The address of engine ``uc``'s ``CPUState`` (Unicorn creates it at first use)."""
        uc.reg_read(X.UC_X86_REG_EAX)
        return _word(_MEM.read(int(uc._uch.value) + self.cpu_off, 8), 0)

    def fill_slot(self, cpu: int) -> int:
        """The address of the fill function pointer the engine's softmmu calls."""
        return _word(_MEM.read(cpu + self.cc_off, 8), 0) + self.fill_off

    def check(self, uc: Any, cpu: int) -> None:
        """Raise :class:`CalibrationError` unless ``uc`` looks as the probe found it."""
        if _word(_MEM.read(self.fill_slot(cpu), 8), 0) != self.fill_cpu:
            raise CalibrationError("CPUClass.tlb_fill", "not Unicorn's x86 fill on this engine")
        want = _env_start(uc, self.context_header)
        if _MEM.read(cpu + self.env_off, len(want)) != want:
            raise CalibrationError("CPUX86State", "the registers are not where probed")


class _Memory:
    """Reads of this process's memory that fail instead of faulting."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._lock = threading.Lock()

    def read(self, address: int, size: int) -> bytes:
        with self._lock:
            if self._fd is None:
                try:
                    self._fd = os.open("/proc/self/mem", os.O_RDONLY | os.O_CLOEXEC)
                except OSError as err:
                    raise CalibrationError("the TLB probe", f"/proc/self/mem: {err}") from err
            fd = self._fd
        if address <= 0 or address >= 1 << 47:
            return b""
        try:
            return os.pread(fd, size, address)
        except OSError:
            return b""


_MEM = _Memory()


def _word(blob: bytes, offset: int) -> int:
    if offset + 8 > len(blob):
        return 0
    return int(struct.unpack_from("<Q", blob, offset)[0])


def _env_start(uc: Any, header: int) -> bytes:
    """The first bytes of the engine's ``CPUX86State`` (its GPRs), as its saved context
    (Unicorn's ``struct uc_context``, include/uc_priv.h) holds them after its header."""
    return bytes(uc.context_save())[header:header + 16 * 8]


def _symbol(name: str) -> int:
    from unicorn.unicorn_py3 import unicorn as ucmod

    lib = ctypes.CDLL(ucmod.uclib._name, handle=ucmod.uclib._handle)
    try:
        return int(ctypes.cast(getattr(lib, name), ctypes.c_void_p).value or 0)
    except AttributeError:
        raise CalibrationError(name, f"not exported by Unicorn {installed_unicorn_version()}") from None


def _pointers(blob: bytes) -> list[tuple[int, int]]:
    """(offset, value) of every aligned word of ``blob`` that could be a heap pointer."""
    out = []
    for off in range(0, len(blob) - 7, 8):
        v = _word(blob, off)
        if 0x10000 <= v < 1 << 47 and v % 8 == 0:
            out.append((off, v))
    return out


def _cpu_candidates(uc: Any, fill_cpu: int) -> tuple[list[tuple[int, int, int]], int]:
    """([(cpu_off, cpu, env_off)] nearest first, the saved context's header size) by the
    GPR pattern (step 1).  A pointer to an object below the CPU on the heap also reaches
    the registers, further on, and one into CPUX86State itself reaches them at once: the
    later steps tell which is the CPU."""
    legacy = (X.UC_X86_REG_RAX, X.UC_X86_REG_RCX, X.UC_X86_REG_RDX, X.UC_X86_REG_RBX,
              X.UC_X86_REG_RSP, X.UC_X86_REG_RBP, X.UC_X86_REG_RSI, X.UC_X86_REG_RDI)
    for i, r in enumerate(legacy):                 # QEMU's R_EAX..R_EDI order
        uc.reg_write(r, 0x5079766D00000000 | (0x1111 * (i + 1)))      # "pyvm" + index
    pattern = b"".join(struct.pack("<Q", uc.reg_read(r)) for r in legacy)
    header = bytes(uc.context_save()).find(pattern)
    if header < 0:
        raise CalibrationError("the context header", "the registers are not in the context")
    handle = int(uc._uch.value)
    seen: set[int] = set()
    found = []
    for off, p in _pointers(_MEM.read(handle, _SCAN_UC)):
        if p in seen or abs(p - fill_cpu) < 1 << 26:          # code of libunicorn itself
            continue
        seen.add(p)
        at = _MEM.read(p, _SCAN_CPU).find(pattern)
        if at >= NB_MMU_MODES * _DESC_FAST and at % 8 == 0:  # f[] comes first
            found.append((off, p, at))
    if not found:
        raise CalibrationError("uc_struct.cpu", "no pointer of the engine leads to its registers")
    return sorted(found, key=lambda c: c[2]), header


def _find_fill_slot(uc: Any, cpu: int, env_off: int, fill_cpu: int,
                    fill_virtual: int) -> tuple[int, int]:
    """(cc_off, fill_off) by switching the engine's TLB mode (step 2)."""
    candidates = []
    for off, p in _pointers(_MEM.read(cpu, env_off)):
        body = _MEM.read(p, _SCAN_CLASS)
        for j in range(0, len(body) - 7, 8):
            if _word(body, j) == fill_cpu:
                candidates.append((off, p, j))
    uc.ctl_set_tlb_mode(UC.UC_TLB_VIRTUAL)
    try:
        switched = [(off, p, j) for off, p, j in candidates
                    if _word(_MEM.read(p + j, 8), 0) == fill_virtual]
    finally:
        uc.ctl_set_tlb_mode(UC.UC_TLB_CPU)
    back = [(off, j) for off, p, j in switched if _word(_MEM.read(p + j, 8), 0) == fill_cpu]
    if len(back) != 1:
        raise CalibrationError("CPUClass.tlb_fill", f"{len(back)} candidate slots")
    return back[0]


def _find_tlb(uc: Any, cpu: int, env_off: int, host: int) -> tuple[int, int]:
    """(tlbf_off, entry_bits) from a guest load of a known page (step 3)."""
    code = bytes.fromhex("8b042500500000")          # mov eax, [0x5000]
    uc.mem_write(0x1000, code)
    uc.emu_start(0x1000, 0x1000 + len(code))
    page = _PROBE_PAGE
    lo = env_off - _SCAN_TLB
    area = _MEM.read(cpu + lo, _SCAN_TLB)
    found = []
    for off in range(0, len(area) - _DESC_FAST + 1, 8):
        mask, table = _word(area, off), _word(area, off + 8)
        if not mask or not table:
            continue
        for bits in (5, 6, 7):
            n = (mask >> bits) + 1
            if mask & ((1 << bits) - 1) or n & (n - 1):
                continue
            entry = _MEM.read(table + (((page >> 12) & (mask >> bits)) << bits), 40)
            if len(entry) < 40:
                continue
            addr_read, _, _, paddr, addend = struct.unpack("<5Q", entry)
            if (addr_read & ~0xFFF) == page and paddr == page and \
                    (page + addend) & ((1 << 64) - 1) == host + page:
                found.append((lo + off - MMU_KNOSMAP_IDX * _DESC_FAST, bits))
    if len(found) != 1:
        raise CalibrationError("CPUTLBDescFast", f"{len(found)} candidate tables")
    return found[0]


_LAYOUT: TlbLayout | None = None
_LAYOUT_ERROR: CalibrationError | None = None
_LOCK = threading.Lock()


def tlb_layout() -> TlbLayout:
    """The layout (probed once per process on a scratch 64-bit engine)."""
    global _LAYOUT, _LAYOUT_ERROR
    with _LOCK:
        if _LAYOUT is not None:
            return _LAYOUT
        if _LAYOUT_ERROR is not None:
            raise _LAYOUT_ERROR
        try:
            _LAYOUT = _probe()
        except CalibrationError as err:
            _LAYOUT_ERROR = err
            raise
        return _LAYOUT


def _probe() -> TlbLayout:
    fill_cpu = _symbol("x86_cpu_tlb_fill_x86_64")
    fill_virtual = _symbol("unicorn_fill_tlb_x86_64")
    ram = ctypes.create_string_buffer(_PROBE_RAM + 0x1000)
    host = (ctypes.addressof(ram) + 0xFFF) & ~0xFFF
    try:
        uc = uc_mod.Uc(uc_mod.UC_ARCH_X86, uc_mod.UC_MODE_64)
        uc.ctl_set_cpu_model(X.UC_CPU_X86_QEMU64)
        uc.mem_map_ptr(0, _PROBE_RAM, uc_mod.UC_PROT_ALL, host)
        candidates, header = _cpu_candidates(uc, fill_cpu)
        failure: CalibrationError | None = None
        for cpu_off, cpu, env_off in candidates:
            try:
                cc_off, fill_off = _find_fill_slot(uc, cpu, env_off, fill_cpu, fill_virtual)
                tlbf_off, entry_bits = _find_tlb(uc, cpu, env_off, host)
            except CalibrationError as err:
                failure = failure or err
                continue
            break
        else:
            assert failure is not None
            raise failure
        layout = TlbLayout(cpu_off, cc_off, fill_off, env_off, tlbf_off, entry_bits, fill_cpu,
                           header)
        layout.check(uc, layout.cpu_of(uc))
        uc.mem_unmap(0, _PROBE_RAM)
        for mode in (uc_mod.UC_MODE_32, uc_mod.UC_MODE_64):     # engines made later
            other = uc_mod.Uc(uc_mod.UC_ARCH_X86, mode)
            other.ctl_set_cpu_model(X.UC_CPU_X86_QEMU64)
            layout.check(other, layout.cpu_of(other))
        return layout
    except uc_mod.UcError as err:
        raise CalibrationError("the TLB probe", f"scratch engine: {err}") from err
    finally:
        del ram
