"""pyvm.userfault: MISSING-mode userfaultfd on a real mmap, with threads that really fault."""

from __future__ import annotations

import ctypes
import mmap
import threading
import time

import pytest

from pyvm.userfault import PAGE_SIZE, Userfault, unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None,
                                reason=unavailable_reason() or "")

NPAGES = 16


def _region(npages: int = NPAGES) -> tuple[mmap.mmap, int, ctypes.c_char]:
    mm = mmap.mmap(-1, npages * PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    anchor = ctypes.c_char.from_buffer(mm)
    return mm, ctypes.addressof(anchor), anchor


def _reader_in_thread(base: int, page: int, out: list[bytes]) -> threading.Thread:
    # The toucher is libc's memcpy called through ctypes, which releases the GIL: a
    # thread blocked on a fault while holding the GIL would stop the test itself.
    libc = ctypes.CDLL(None)
    buf = ctypes.create_string_buffer(PAGE_SIZE)

    def touch() -> None:
        libc.memcpy(buf, ctypes.c_void_p(base + page * PAGE_SIZE), ctypes.c_size_t(PAGE_SIZE))
        out.append(buf.raw)
    t = threading.Thread(target=touch, daemon=True)
    t.start()
    return t


def test_a_touch_of_a_missing_page_blocks_until_copy_places_it() -> None:
    mm, base, anchor = _region()
    with Userfault(thread_ids=True) as uffd:
        uffd.register_missing(base, NPAGES * PAGE_SIZE)
        got: list[bytes] = []
        t = _reader_in_thread(base, 5, got)
        faults = []
        deadline = time.monotonic() + 10
        while not faults and time.monotonic() < deadline:
            faults = uffd.read_faults(timeout=0.5)
        assert faults, "no fault event arrived"
        assert faults[0].address == base + 5 * PAGE_SIZE
        assert not faults[0].write
        assert faults[0].thread_id > 0
        assert t.is_alive(), "the reader went on without the page"
        page = bytes(range(256)) * (PAGE_SIZE // 256)
        assert uffd.copy(faults[0].address, page) is True
        t.join(10)
        assert not t.is_alive()
        assert got == [page]
        # the page is now present: a second copy is refused without writing
        assert uffd.copy(faults[0].address, b"\xff" * PAGE_SIZE) is False
        assert mm[5 * PAGE_SIZE:6 * PAGE_SIZE] == page
    del anchor
    mm.close()


def test_zeropage_resolves_a_fault_with_zeros_and_other_pages_stay_missing() -> None:
    mm, base, anchor = _region()
    with Userfault() as uffd:
        uffd.register_missing(base, NPAGES * PAGE_SIZE)
        got: list[bytes] = []
        t = _reader_in_thread(base, 2, got)
        faults = []
        deadline = time.monotonic() + 10
        while not faults and time.monotonic() < deadline:
            faults = uffd.read_faults(timeout=0.5)
        assert [f.address for f in faults] == [base + 2 * PAGE_SIZE]
        assert uffd.zeropage(base + 2 * PAGE_SIZE) is True
        t.join(10)
        assert got == [bytes(PAGE_SIZE)]
        # pages placed ahead of any access never fault
        data = bytearray(b"\x5a" * (2 * PAGE_SIZE))
        assert uffd.copy(base + 8 * PAGE_SIZE, data) is True
        assert uffd.read_faults(timeout=0) == []
        assert mm[8 * PAGE_SIZE:10 * PAGE_SIZE] == bytes(data)
    del anchor
    mm.close()


def test_one_fault_blocks_only_its_thread() -> None:
    """A thread stuck on a missing page does not hold up a thread touching placed pages."""
    mm, base, anchor = _region()
    with Userfault() as uffd:
        uffd.register_missing(base, NPAGES * PAGE_SIZE)
        uffd.copy(base, b"\x01" * PAGE_SIZE)
        blocked: list[bytes] = []
        t_blocked = _reader_in_thread(base, 7, blocked)
        deadline = time.monotonic() + 10
        faults = []
        while not faults and time.monotonic() < deadline:
            faults = uffd.read_faults(timeout=0.5)
        free: list[bytes] = []
        t_free = _reader_in_thread(base, 0, free)
        t_free.join(10)
        assert free == [b"\x01" * PAGE_SIZE]
        assert t_blocked.is_alive()
        uffd.copy(base + 7 * PAGE_SIZE, b"\x07" * PAGE_SIZE)
        t_blocked.join(10)
        assert blocked == [b"\x07" * PAGE_SIZE]
    del anchor
    mm.close()


def test_unicorn_blocks_inside_its_access_until_the_page_arrives() -> None:
    """The destination's situation: a vCPU (Unicorn on the shared mmap, emu_start called
    with the GIL released) reads a page that is not there yet."""
    from unicorn import Uc, UC_ARCH_X86, UC_MODE_64
    from unicorn.x86_const import UC_X86_REG_RAX, UC_X86_REG_RBX
    mm, base, anchor = _region()
    # code page: mov rax, [rbx]; hlt-free end by address
    code = b"\x48\x8b\x03"
    with Userfault() as uffd:
        uffd.register_missing(base, NPAGES * PAGE_SIZE)
        uffd.copy(base, code + bytes(PAGE_SIZE - len(code)))
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        uc.mem_map_ptr(0, NPAGES * PAGE_SIZE, 7, base)
        uc.reg_write(UC_X86_REG_RBX, 9 * PAGE_SIZE + 8)
        errors: list[BaseException] = []

        def run() -> None:
            try:
                uc.emu_start(0, len(code))
            except BaseException as err:  # noqa: BLE001 - reported by the test
                errors.append(err)
        t = threading.Thread(target=run, daemon=True)
        t.start()
        faults = []
        deadline = time.monotonic() + 10
        while not faults and time.monotonic() < deadline:
            faults = uffd.read_faults(timeout=0.5)
        assert [f.address for f in faults] == [base + 9 * PAGE_SIZE]
        assert t.is_alive()
        page = bytearray(PAGE_SIZE)
        page[8:16] = (0x1122334455667788).to_bytes(8, "little")
        uffd.copy(base + 9 * PAGE_SIZE, page)
        t.join(10)
        assert not t.is_alive() and not errors
        assert uc.reg_read(UC_X86_REG_RAX) == 0x1122334455667788
    del anchor
    mm.close()


def test_ranges_must_be_whole_pages() -> None:
    with Userfault() as uffd:
        with pytest.raises(ValueError):
            uffd.register_missing(4096 + 1, 4096)
        with pytest.raises(ValueError):
            uffd.zeropage(0, 100)
