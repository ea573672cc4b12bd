# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Dirty tracking in the vCPU's TLB fill (pyvm/tlb_tracking.py says when it is used).

QEMU tracks a guest's writes for migration in its softmmu: a TLB entry for a clean page
is made without write permission, so the first store to the page after each bitmap sync
goes to the slow path, which marks the page and makes the entry writable; every later
store takes the fast path (``notdirty_write`` in QEMU's accel/tcg/cputlb.c; the bitmap
sync re-arms it, ``tlb_reset_dirty``).  Unicorn 2.1 keeps that machinery but stubs the
dirty memory bitmap out, so pyvm does the same one level up, in the function that fills
the TLB:

- :class:`TlbWriteTracker` puts :c:func:`pyvm_tlbt_fill` in the engine's
  ``CPUClass.tlb_fill`` slot (found by :mod:`pyvm.unicorn_tlb`), in front of Unicorn's
  own x86 fill, which still walks the guest's page tables, sets their accessed and dirty
  bits and raises #PF exactly as before;
- after a fill for a store, the page is marked in the tracker's bitmap of its RAM block
  (one per block, kept apart from the block's dirty bitmap);
- after a fill for a load or a fetch of a page that is clean in that bitmap, the new
  entry's ``addr_write`` is cleared, so the first store to the page comes back here;
- at every sync (``DirtyBitmap.fetch_and_clear`` on the vCPU loop, which calls
  ``collect_into`` of pyvm/tlb_tracking.py) the marks are folded into the dirty bitmap
  and cleared and the engine's TLB is flushed, so no writable entry outlives the marks
  it was made for.

The page walk writes the accessed and dirty bits of the guest's paging entries straight
into RAM (QEMU's ``x86_stl_phys_notdirty``, target/i386/excp_helper.c), past the TLB.
Before each fill the walk is done here too, read-only: an entry on the path whose
accessed bit is clear (or, for a store, a leaf whose dirty bit is clear) is where the
fill may write, and its page is marked (Intel SDM Vol. 3A §4.8; 32-bit, PAE and 4-level
paging, 4 KiB to 1 GiB pages; 5-level paging is walked too, though the CPU model pyvm
gives its guests does not offer it, so no test covers it).

Cost: one C call and a short walk per TLB fill, against a host page fault per page per
round for host write-protect (docs/performance.md).  Other writers (devices, the native
interrupt delivery) mark the bitmap themselves; see ``RamBlock.write``.
"""

from libc.stdint cimport uint8_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free

cdef extern from *:
    """
    #include <stdint.h>
    #include <stdbool.h>
    #include <string.h>

    /* x86_cpu_tlb_fill (QEMU target/i386/excp_helper.c, Unicorn 2.1.4) */
    typedef bool (*pyvm_tlbt_fill_fn)(void *cs, uint64_t addr, int size, int access,
                                      int mmu_idx, bool probe, uintptr_t retaddr);
    enum { PYVM_MMU_DATA_STORE = 1 };           /* MMUAccessType */

    #define PYVM_TLBT_MAX_BLOCKS 16
    #define PYVM_TLBT_MAX_ENGINES 256
    typedef struct {
        uint64_t gpa, size;
        uint8_t *host;
        uint64_t *words;            /* the block's DirtyBitmap storage */
    } pyvm_tlbt_block;

    typedef struct {
        uint8_t *cs;                /* the engine's CPUState */
        pyvm_tlbt_fill_fn original;
        ptrdiff_t env_off, tlbf_off;
        int entry_bits;
        ptrdiff_t cr0_off, cr3_off, cr4_off, efer_off;     /* in CPUX86State */
        int nblocks;
        pyvm_tlbt_block blocks[PYVM_TLBT_MAX_BLOCKS];
        uint64_t fills, store_fills, read_only, table_marks, misses;
    } pyvm_tlbt;

    static pyvm_tlbt *pyvm_tlbt_engines[PYVM_TLBT_MAX_ENGINES];
    static pyvm_tlbt *pyvm_tlbt_last;          /* the engine of the last fill */
    static pyvm_tlbt_fill_fn pyvm_tlbt_default;

    static int pyvm_tlbt_register(pyvm_tlbt *t) {
        int i;
        for (i = 0; i < PYVM_TLBT_MAX_ENGINES; i++)
            if (!pyvm_tlbt_engines[i]) {
                pyvm_tlbt_engines[i] = t;
                return 0;
            }
        return -1;
    }
    static void pyvm_tlbt_unregister(pyvm_tlbt *t) {
        int i;
        for (i = 0; i < PYVM_TLBT_MAX_ENGINES; i++)
            if (pyvm_tlbt_engines[i] == t)
                pyvm_tlbt_engines[i] = NULL;
        if (pyvm_tlbt_last == t)
            pyvm_tlbt_last = NULL;
    }
    static inline pyvm_tlbt *pyvm_tlbt_find(void *cs) {
        int i;
        if (pyvm_tlbt_last && pyvm_tlbt_last->cs == cs)
            return pyvm_tlbt_last;
        for (i = 0; i < PYVM_TLBT_MAX_ENGINES; i++)
            if (pyvm_tlbt_engines[i] && pyvm_tlbt_engines[i]->cs == cs)
                return pyvm_tlbt_last = pyvm_tlbt_engines[i];
        return NULL;
    }

    static inline pyvm_tlbt_block *pyvm_tlbt_block_of(pyvm_tlbt *t, uint64_t gpa) {
        int i;
        for (i = 0; i < t->nblocks; i++)
            if (gpa - t->blocks[i].gpa < t->blocks[i].size)
                return &t->blocks[i];
        return NULL;
    }
    static inline void pyvm_tlbt_mark(pyvm_tlbt_block *b, uint64_t gpa) {
        uint64_t page = (gpa - b->gpa) >> 12;
        __atomic_fetch_or(&b->words[page >> 6], 1ULL << (page & 63), __ATOMIC_RELAXED);
    }
    static inline int pyvm_tlbt_is_dirty(pyvm_tlbt_block *b, uint64_t gpa) {
        uint64_t page = (gpa - b->gpa) >> 12;
        return (__atomic_load_n(&b->words[page >> 6], __ATOMIC_RELAXED) >> (page & 63)) & 1;
    }
    /* A paging entry of `size` bytes at guest-physical `gpa`; 0 (not present) outside RAM. */
    static inline uint64_t pyvm_tlbt_entry(pyvm_tlbt *t, uint64_t gpa, int size,
                                           pyvm_tlbt_block **where) {
        uint64_t v = 0;
        pyvm_tlbt_block *b = pyvm_tlbt_block_of(t, gpa);
        *where = b;
        if (b && gpa + size - b->gpa <= b->size)
            memcpy(&v, b->host + (gpa - b->gpa), size);
        return v;
    }

    #define PG_P (1ULL << 0)
    #define PG_A (1ULL << 5)
    #define PG_D (1ULL << 6)
    #define PG_PS (1ULL << 7)
    #define PG_ADDR 0x000FFFFFFFFFF000ULL

    /* Mark the pages of the paging entries the fill may set A or D in (see the module). */
    static void pyvm_tlbt_walk(pyvm_tlbt *t, const uint8_t *env, uint64_t va, int write) {
        uint64_t cr0, cr3, cr4, efer, table, gpa, e = 0;
        int level, size = 8;
        pyvm_tlbt_block *b;
        memcpy(&cr0, env + t->cr0_off, 8);
        if (!(cr0 & (1ULL << 31)))
            return;                                     /* CR0.PG clear: no walk */
        memcpy(&cr3, env + t->cr3_off, 8);
        memcpy(&cr4, env + t->cr4_off, 8);
        memcpy(&efer, env + t->efer_off, 8);
        if (!(cr4 & (1ULL << 5))) {                     /* 32-bit paging */
            size = 4;
            table = cr3 & 0xFFFFF000ULL;
            level = 2;
        } else if (efer & (1ULL << 10)) {               /* IA-32e: 4 or 5 levels */
            table = cr3 & PG_ADDR;
            level = (cr4 & (1ULL << 12)) ? 5 : 4;
        } else {                                        /* PAE: PDPTEs have no A bit */
            e = pyvm_tlbt_entry(t, (cr3 & 0xFFFFFFE0ULL) + ((va >> 30) & 3) * 8, 8, &b);
            if (!(e & PG_P))
                return;
            table = e & PG_ADDR;
            level = 2;
        }
        for (; level >= 1; level--) {
            int shift = size == 4 ? 12 + 10 * (level - 1) : 12 + 9 * (level - 1);
            uint64_t index = (va >> shift) & (size == 4 ? 0x3FF : 0x1FF);
            int leaf;
            gpa = table + index * size;
            e = pyvm_tlbt_entry(t, gpa, size, &b);
            if (!(e & PG_P))
                return;
            leaf = level == 1 || ((e & PG_PS) && (size == 8 ? level <= 3 : (cr4 & (1ULL << 4)) != 0));
            if (b && (!(e & PG_A) || (leaf && write && !(e & PG_D)))) {
                pyvm_tlbt_mark(b, gpa);
                t->table_marks++;
            }
            if (leaf)
                return;
            table = size == 4 ? (e & 0xFFFFF000ULL) : (e & PG_ADDR);
        }
    }

    static bool pyvm_tlbt_fill(void *cs, uint64_t addr, int size, int access, int mmu_idx,
                               bool probe, uintptr_t retaddr) {
        pyvm_tlbt *t = pyvm_tlbt_find(cs);
        const uint8_t *entry, *fast;
        uint64_t mask, table, paddr, tag, clear = ~0ULL;
        pyvm_tlbt_block *b;
        if (!t)
            return pyvm_tlbt_default(cs, addr, size, access, mmu_idx, probe, retaddr);
        t->fills++;
        pyvm_tlbt_walk(t, t->cs + t->env_off, addr, access == PYVM_MMU_DATA_STORE);
        /* Unicorn's fill: on a fault it raises #PF and does not come back */
        if (!t->original(cs, addr, size, access, mmu_idx, probe, retaddr))
            return false;
        fast = t->cs + t->tlbf_off + 16 * mmu_idx;     /* CPUTLBDescFast {mask, table} */
        memcpy(&mask, fast, 8);
        memcpy(&table, fast + 8, 8);
        entry = (const uint8_t *)(uintptr_t)table
                + (((addr >> 12) & (mask >> t->entry_bits)) << t->entry_bits);
        /* CPUTLBEntry: addr_read, addr_write, addr_code, paddr, addend */
        memcpy(&tag, entry + (access == PYVM_MMU_DATA_STORE ? 8 : access == 2 ? 16 : 0), 8);
        memcpy(&paddr, entry + 24, 8);
        if ((tag & ~0xFFFULL) != (addr & ~0xFFFULL)) {
            /* not the entry just made: cannot happen with the probed layout; take
               write permission away from nothing, but remember it */
            t->misses++;
            return true;
        }
        b = pyvm_tlbt_block_of(t, paddr);
        if (!b)
            return true;                            /* not RAM pyvm tracks (ROM, MMIO) */
        if (access == PYVM_MMU_DATA_STORE) {
            pyvm_tlbt_mark(b, paddr);
            t->store_fills++;
        } else if (!pyvm_tlbt_is_dirty(b, paddr)) {
            uint64_t w;
            memcpy(&w, entry + 8, 8);
            if (w != clear) {
                memcpy((uint8_t *)entry + 8, &clear, 8);   /* addr_write = -1: no write */
                t->read_only++;
            }
        }
        return true;
    }
    static uintptr_t pyvm_tlbt_fill_address(void) { return (uintptr_t)&pyvm_tlbt_fill; }
    static void pyvm_tlbt_set_original(pyvm_tlbt *t, uintptr_t fn) {
        t->original = (pyvm_tlbt_fill_fn)fn;
    }
    static uintptr_t pyvm_tlbt_original(pyvm_tlbt *t) { return (uintptr_t)t->original; }
    static void pyvm_tlbt_set_default(uintptr_t fn) {
        pyvm_tlbt_default = (pyvm_tlbt_fill_fn)fn;
    }
    """
    ctypedef struct pyvm_tlbt_block:
        uint64_t gpa
        uint64_t size
        uint8_t *host
        uint64_t *words
    ctypedef struct pyvm_tlbt:
        uint8_t *cs
        Py_ssize_t env_off
        Py_ssize_t tlbf_off
        int entry_bits
        Py_ssize_t cr0_off
        Py_ssize_t cr3_off
        Py_ssize_t cr4_off
        Py_ssize_t efer_off
        int nblocks
        pyvm_tlbt_block blocks[16]
        uint64_t fills
        uint64_t store_fills
        uint64_t read_only
        uint64_t table_marks
        uint64_t misses
    int PYVM_TLBT_MAX_BLOCKS
    int pyvm_tlbt_register(pyvm_tlbt *t)
    void pyvm_tlbt_unregister(pyvm_tlbt *t)
    uintptr_t pyvm_tlbt_fill_address()
    void pyvm_tlbt_set_default(uintptr_t fn)
    void pyvm_tlbt_set_original(pyvm_tlbt *t, uintptr_t fn)
    uintptr_t pyvm_tlbt_original(pyvm_tlbt *t)

IMPLEMENTATION = "cython"


cdef class TlbWriteTracker:
    """Track one engine's stores into the dirty bitmaps of RAM blocks through its TLB fill.

    ``cpu`` is the engine's ``CPUState``, ``slot`` the address of its ``tlb_fill`` pointer
    and ``original`` the function found there (Unicorn's x86 fill); ``env_off``,
    ``tlbf_off`` and ``entry_bits`` come from :class:`pyvm.unicorn_tlb.TlbLayout`; the
    ``*_off`` of CR0, CR3, CR4 and EFER are offsets in ``CPUX86State``.  ``blocks`` holds
    ``(gpa, size, host address, bitmap words address)`` per RAM block (the tracker's own
    bitmaps, pyvm/tlb_tracking.py); they must outlive the tracker.  :meth:`attach` and :meth:`detach` run on the vCPU loop while the
    engine is stopped; flush the engine's TLB after either.
    """

    cdef pyvm_tlbt *_t
    cdef uintptr_t _slot
    cdef readonly bint attached
    cdef object _keep

    def __cinit__(self, uintptr_t cpu, uintptr_t slot, uintptr_t original,
                  Py_ssize_t env_off, Py_ssize_t tlbf_off, int entry_bits,
                  Py_ssize_t cr0_off, Py_ssize_t cr3_off, Py_ssize_t cr4_off,
                  Py_ssize_t efer_off, tuple blocks, object keep=None):
        cdef int i
        if len(blocks) > PYVM_TLBT_MAX_BLOCKS:
            raise ValueError(f"at most {PYVM_TLBT_MAX_BLOCKS} RAM blocks")
        if not cpu or not slot or not original:
            raise ValueError("null engine address")
        self._t = <pyvm_tlbt *>calloc(1, sizeof(pyvm_tlbt))
        if self._t == NULL:
            raise MemoryError()
        self._t.cs = <uint8_t *>cpu
        pyvm_tlbt_set_original(self._t, original)
        self._t.env_off = env_off
        self._t.tlbf_off = tlbf_off
        self._t.entry_bits = entry_bits
        self._t.cr0_off = cr0_off
        self._t.cr3_off = cr3_off
        self._t.cr4_off = cr4_off
        self._t.efer_off = efer_off
        for i, (gpa, size, host, words) in enumerate(blocks):
            self._t.blocks[i].gpa = gpa
            self._t.blocks[i].size = size
            self._t.blocks[i].host = <uint8_t *><uintptr_t>host
            self._t.blocks[i].words = <uint64_t *><uintptr_t>words
        self._t.nblocks = len(blocks)
        self._slot = slot
        self._keep = keep
        pyvm_tlbt_set_default(original)

    def attach(self):
        """Put the tracking fill in the engine's slot."""
        if self.attached:
            return
        cdef uintptr_t *slot = <uintptr_t *>self._slot
        if slot[0] != pyvm_tlbt_original(self._t):
            raise RuntimeError("the engine's TLB fill is not the one the tracker wraps")
        if pyvm_tlbt_register(self._t) != 0:
            raise OverflowError("too many engines tracked at once")
        slot[0] = pyvm_tlbt_fill_address()
        self.attached = True

    def detach(self):
        """Give the engine its own fill back."""
        if not self.attached:
            return
        cdef uintptr_t *slot = <uintptr_t *>self._slot
        slot[0] = pyvm_tlbt_original(self._t)
        pyvm_tlbt_unregister(self._t)
        self.attached = False

    @property
    def stats(self):
        """Fills seen, fills for a store, entries made read-only, paging-entry pages
        marked, and entries not found where expected (always 0)."""
        return {"fills": self._t.fills, "store_fills": self._t.store_fills,
                "read_only": self._t.read_only, "table_marks": self._t.table_marks,
                "misses": self._t.misses}

    def __dealloc__(self):
        if self._t != NULL:
            if self.attached:
                (<uintptr_t *>self._slot)[0] = pyvm_tlbt_original(self._t)
                pyvm_tlbt_unregister(self._t)
            free(self._t)
            self._t = NULL
