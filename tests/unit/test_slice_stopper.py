"""The slice stopper (native and twin): a request or a deadline ends a run exactly at a
block boundary, and HLT is told apart from a stop by the stop counter."""

from __future__ import annotations

import ctypes
import mmap
import threading
import time

import numpy as np
import pytest
import unicorn as U
from unicorn import x86_const as X

from pyvm import fastpath, fastpath_py

# esi = 1 MiB, ebx = 1024; loop: incb (%esi); add $4096, %esi; dec %ebx; jnz loop; jmp start
LOOP = bytes.fromhex("be00001000" "bb00040000" "fe06" "81c600100000" "4b" "75f5" "ebe9")


def _engine():
    uc = U.Uc(U.UC_ARCH_X86, U.UC_MODE_32)
    mm = mmap.mmap(-1, 16 << 20)
    anchor = ctypes.c_char.from_buffer(mm)
    uc.mem_map_ptr(0, 16 << 20, U.UC_PROT_ALL, ctypes.addressof(anchor))
    mm[0x1000:0x1000 + len(LOOP)] = LOOP
    return uc, mm, anchor


@pytest.mark.parametrize("impl", ["native", "python"])
def test_requests_from_another_thread_stop_exactly(impl: str, monkeypatch) -> None:
    if impl == "python":
        monkeypatch.setattr(fastpath, "impl", fastpath_py)
    uc, mm, anchor = _engine()
    stopper = fastpath.slice_stopper(uc)
    view = np.frombuffer(mm, dtype=np.uint8)
    done = threading.Event()

    def kicker() -> None:
        while not done.is_set():
            time.sleep(0.002)
            stopper.request()
    t = threading.Thread(target=kicker)
    t.start()
    pc, runs, end = 0x1000, 0, time.monotonic() + (0.6 if impl == "native" else 0.3)
    try:
        while time.monotonic() < end:
            stopper.set_deadline(time.monotonic_ns() + 50_000_000)
            uc.emu_start(pc, 1 << 62)
            pc = uc.reg_read(X.UC_X86_REG_EIP)
            runs += 1
    finally:
        done.set()
        t.join()
    assert stopper.stops == runs and runs > 10
    firsts = view[0x100000:0x100000 + 1024 * 4096:4096]
    values = [int(v) for v in firsts]
    x = values[-1]
    k = sum(1 for v in values if v == (x + 1) % 256)
    assert all(v == (x + 1) % 256 for v in values[:k]) and all(v == x for v in values[k:])
    stopper.detach()
    del view, anchor


def test_deadline_ends_a_run_and_hlt_is_not_a_stop() -> None:
    uc, mm, anchor = _engine()
    stopper = fastpath.slice_stopper(uc)
    stopper.set_deadline(time.monotonic_ns() + 20_000_000)
    t0 = time.monotonic()
    uc.emu_start(0x1000, 1 << 62)
    assert 0.015 < time.monotonic() - t0 < 1.0
    assert stopper.stops == 1
    mm[0x2000] = 0xF4                                   # hlt
    stopper.set_deadline(time.monotonic_ns() + 10**10)
    uc.emu_start(0x2000, 1 << 62)
    assert stopper.stops == 1                           # HLT ended that run, not the stopper
    stopper.detach()
    del anchor
