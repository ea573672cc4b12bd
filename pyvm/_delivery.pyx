# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Native interrupt and exception delivery: the C twin of ``VCpu.deliver`` (pyvm/cpu.py).

It vectors an interrupt or exception exactly as the Python version does (Intel SDM Vol. 3,
6.12 "Exception and interrupt handling"): through the IVT in real mode, a 32-bit IDT
interrupt/trap gate in protected mode (with the SS0:ESP0 stack switch from a 32-bit TSS),
a 16-byte gate in long mode (RSPn or an IST stack from the 64-bit TSS), pushing the
error code for the vectors that have one, and escalating a failed delivery to #DF and
then to a triple fault.  Same steps, same order, same register writes, same messages; the
tests run both on the same generated cases and compare every register and the stack.

Everything goes through Unicorn's public C API, called through the function pointers
the Python binding's library exports (``uc_reg_read``, ``uc_reg_write``,
``uc_vmem_translate``, ``uc_context_save``/``restore`` for the CPL in QEMU's ``hflags``,
whose offset :mod:`pyvm.unicorn_internals` calibrates).  Guest RAM is read and written
in place through the RAM blocks' host mappings, and a written page is marked in the
block's dirty bitmap as :meth:`pyvm.ram.RamBlock.write` does.

:mod:`pyvm.native_delivery` builds one :class:`Delivery` per vCPU; ``PYVM_PURE_PYTHON=1``
selects the Python twin instead.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free

cdef extern from *:
    """
    #include <stdint.h>
    #include <stdio.h>
    #include <string.h>

    typedef int (*pyvm_reg_fn)(void *uc, int regid, void *value);
    typedef int (*pyvm_vmem_fn)(void *uc, uint64_t addr, int prot, uint64_t *pa);
    typedef int (*pyvm_ctx_fn)(void *uc, void *ctx);

    enum { DR_EFLAGS, DR_RFLAGS, DR_EIP, DR_RIP, DR_ESP, DR_RSP, DR_CS, DR_SS, DR_CR0,
           DR_IDTR, DR_GDTR, DR_TR, DR_MSR, DR_NREGS };

    #define DLV_MAX_BLOCKS 8
    typedef struct pyvm_ram_block {
        uint64_t gpa, size;
        uint8_t *host;
        uint64_t *bitmap;           /* the block's DirtyBitmap words */
    } pyvm_ram_block;

    typedef struct pyvm_dlv {
        void *uc;
        pyvm_reg_fn reg_read, reg_write;
        pyvm_vmem_fn translate;
        pyvm_ctx_fn ctx_save, ctx_restore;
        uint8_t *ctx;               /* a uc_context of this engine */
        uint64_t hflags_off;        /* offset of hflags in the context */
        int wide;                   /* UC_MODE_64 engine: 64-bit register names */
        int regs[DR_NREGS];
        int nblocks;
        pyvm_ram_block blocks[DLV_MAX_BLOCKS];
        int uc_err;                 /* status 2: the Unicorn error */
        char msg[192];              /* status 1: why delivery failed */
        /* The exception hook (UC_HOOK_INTR): what it saw, and where QEMU keeps it. */
        uint64_t error_code_off, is_int_off, old_exception_off;
        int (*emu_stop)(void *uc);
        int taken, intno, ctx_err;
        uint32_t error_code, is_int;
    } pyvm_dlv;

    /* uc_x86_mmr and uc_x86_msr (unicorn/x86.h) */
    typedef struct { uint16_t selector; uint64_t base; uint32_t limit; uint32_t flags; } dlv_mmr;
    typedef struct { uint32_t rid; uint64_t value; } dlv_msr;

    #define DLV_OK 0
    #define DLV_FAULT 1             /* what the Python version raises ValueError for */
    #define DLV_UCERR 2             /* a Unicorn call failed (UcError in Python) */
    #define TRY(x) do { int r_ = (x); if (r_) return r_; } while (0)

    #define EF_TF (1u << 8)
    #define EF_IF (1u << 9)
    #define EF_NT (1u << 14)
    #define EF_RF (1u << 16)
    #define EF_VM (1u << 17)
    #define CR0_PE 1ull
    #define CR0_PG (1ull << 31)
    #define EFER_LMA (1ull << 10)
    #define MSR_EFER 0xC0000080u
    #define HF_CPL_MASK 3u

    static int dlv_fail(pyvm_dlv *d, const char *fmt, unsigned long long a, unsigned long long b) {
        snprintf(d->msg, sizeof d->msg, fmt, a, b);
        return DLV_FAULT;
    }

    static int dlv_get(pyvm_dlv *d, int which, uint64_t *out) {
        int err;
        *out = 0;
        err = d->reg_read(d->uc, d->regs[which], out);
        if (err) { d->uc_err = err; return DLV_UCERR; }
        return DLV_OK;
    }

    static int dlv_set(pyvm_dlv *d, int which, uint64_t value) {
        int err = d->reg_write(d->uc, d->regs[which], &value);
        if (err) { d->uc_err = err; return DLV_UCERR; }
        return DLV_OK;
    }

    static int dlv_get_mmr(pyvm_dlv *d, int which, dlv_mmr *m) {
        int err;
        memset(m, 0, sizeof *m);
        err = d->reg_read(d->uc, d->regs[which], m);
        if (err) { d->uc_err = err; return DLV_UCERR; }
        return DLV_OK;
    }

    static int dlv_efer(pyvm_dlv *d, uint64_t *out) {
        dlv_msr m;
        int err;
        m.rid = MSR_EFER;
        m.value = 0;
        err = d->reg_read(d->uc, d->regs[DR_MSR], &m);
        if (err) { d->uc_err = err; return DLV_UCERR; }
        *out = m.value;
        return DLV_OK;
    }

    static int dlv_cpl(pyvm_dlv *d, unsigned *cpl) {
        uint32_t hf;
        int err = d->ctx_save(d->uc, d->ctx);
        if (err) { d->uc_err = err; return DLV_UCERR; }
        memcpy(&hf, d->ctx + d->hflags_off, 4);
        *cpl = hf & HF_CPL_MASK;
        return DLV_OK;
    }

    /* The CPL lives in hflags only (QEMU target/i386/cpu.h HF_CPL_MASK). */
    static int dlv_set_cpl(pyvm_dlv *d, unsigned cpl) {
        uint32_t hf;
        int err = d->ctx_save(d->uc, d->ctx);
        if (err) { d->uc_err = err; return DLV_UCERR; }
        memcpy(&hf, d->ctx + d->hflags_off, 4);
        hf = (hf & ~HF_CPL_MASK) | (cpl & HF_CPL_MASK);
        memcpy(d->ctx + d->hflags_off, &hf, 4);
        err = d->ctx_restore(d->uc, d->ctx);
        if (err) { d->uc_err = err; return DLV_UCERR; }
        return DLV_OK;
    }

    /* Linear -> guest-physical (identity when paging is off), as VCpu.translate. */
    static int dlv_translate(pyvm_dlv *d, uint64_t linear, int write, uint64_t *pa) {
        uint64_t cr0;
        TRY(dlv_get(d, DR_CR0, &cr0));
        if (!(cr0 & CR0_PG)) { *pa = linear & 0xFFFFFFFFull; return DLV_OK; }
        /* UC_PROT_READ = 1, UC_PROT_WRITE = 2 (unicorn.h uc_prot) */
        if (d->translate(d->uc, linear, write ? 2 : 1, pa) != 0)
            return dlv_fail(d, "linear address 0x%llx is not mapped by the guest", linear, 0);
        return DLV_OK;
    }

    static pyvm_ram_block *dlv_block(pyvm_dlv *d, uint64_t gpa, uint64_t size) {
        int i;
        for (i = 0; i < d->nblocks; i++) {
            pyvm_ram_block *b = &d->blocks[i];
            if (gpa >= b->gpa && gpa - b->gpa <= b->size && size <= b->size - (gpa - b->gpa))
                return b;
        }
        return NULL;
    }

    static int dlv_read(pyvm_dlv *d, uint64_t linear, void *out, uint64_t size) {
        uint8_t *p = (uint8_t *)out;
        while (size > 0) {
            uint64_t chunk = 0x1000 - (linear & 0xFFF), pa;
            pyvm_ram_block *b;
            if (chunk > size) chunk = size;
            TRY(dlv_translate(d, linear, 0, &pa));
            b = dlv_block(d, pa, chunk);
            if (!b) return dlv_fail(d, "guest-physical range [0x%llx, +0x%llx) is not RAM", pa, chunk);
            memcpy(p, b->host + (pa - b->gpa), chunk);
            p += chunk; linear += chunk; size -= chunk;
        }
        return DLV_OK;
    }

    static void dlv_mark(pyvm_ram_block *b, uint64_t off, uint64_t len) {
        uint64_t pg, last = (off + len - 1) >> 12;
        for (pg = off >> 12; pg <= last; pg++)
            __atomic_fetch_or(&b->bitmap[pg >> 6], 1ULL << (pg & 63), __ATOMIC_RELAXED);
    }

    static int dlv_write(pyvm_dlv *d, uint64_t linear, const void *data, uint64_t size) {
        const uint8_t *p = (const uint8_t *)data;
        while (size > 0) {
            uint64_t chunk = 0x1000 - (linear & 0xFFF), pa;
            pyvm_ram_block *b;
            if (chunk > size) chunk = size;
            TRY(dlv_translate(d, linear, 1, &pa));
            b = dlv_block(d, pa, chunk);
            if (!b) return dlv_fail(d, "guest-physical range [0x%llx, +0x%llx) is not RAM", pa, chunk);
            memcpy(b->host + (pa - b->gpa), p, chunk);
            dlv_mark(b, pa - b->gpa, chunk);
            p += chunk; linear += chunk; size -= chunk;
        }
        return DLV_OK;
    }

    /* Exceptions that push an error code (SDM Vol. 3, table 6-1). */
    static int dlv_has_error_code(int vector) {
        switch (vector) {
        case 8: case 10: case 11: case 12: case 13: case 14: case 17: case 21: return 1;
        default: return 0;
        }
    }

    static int dlv_real(pyvm_dlv *d, int vector) {
        dlv_mmr idtr;
        uint16_t ent[2], w;
        uint64_t flags, ss, esp, cs, eip, ss_base, sp;
        TRY(dlv_get_mmr(d, DR_IDTR, &idtr));
        if ((uint64_t)vector * 4 + 3 > idtr.limit)
            return dlv_fail(d, "vector 0x%llx beyond the IVT limit", vector, 0);
        TRY(dlv_read(d, idtr.base + (uint64_t)vector * 4, ent, 4));
        TRY(dlv_get(d, DR_EFLAGS, &flags));
        TRY(dlv_get(d, DR_SS, &ss));
        ss_base = ss << 4;
        TRY(dlv_get(d, DR_ESP, &esp));
        sp = esp & 0xFFFF;
        TRY(dlv_get(d, DR_CS, &cs));
        TRY(dlv_get(d, DR_EIP, &eip));
        sp = (sp - 2) & 0xFFFF; w = (uint16_t)flags; TRY(dlv_write(d, ss_base + sp, &w, 2));
        sp = (sp - 2) & 0xFFFF; w = (uint16_t)cs;    TRY(dlv_write(d, ss_base + sp, &w, 2));
        sp = (sp - 2) & 0xFFFF; w = (uint16_t)eip;   TRY(dlv_write(d, ss_base + sp, &w, 2));
        TRY(dlv_get(d, DR_ESP, &esp));
        TRY(dlv_set(d, DR_ESP, (esp & 0xFFFF0000ull) | sp));
        TRY(dlv_set(d, DR_EFLAGS, flags & ~(uint64_t)(EF_IF | EF_TF)));
        TRY(dlv_set(d, DR_CS, ent[1]));
        TRY(dlv_set(d, DR_EIP, ent[0]));
        return DLV_OK;
    }

    /* Base of a segment from the GDT (protected mode), as VCpu._segment_base. */
    static int dlv_segment_base(pyvm_dlv *d, uint64_t selector, uint64_t *base) {
        dlv_mmr gdtr;
        uint64_t index = selector & ~7ull, desc;
        TRY(dlv_get_mmr(d, DR_GDTR, &gdtr));
        if ((selector & 4) || index + 7 > gdtr.limit) { *base = 0; return DLV_OK; }
        TRY(dlv_read(d, gdtr.base + index, &desc, 8));
        *base = ((desc >> 16) & 0xFFFFFF) | (((desc >> 56) & 0xFF) << 24);
        return DLV_OK;
    }

    static int dlv_tss_base(pyvm_dlv *d, uint64_t *base) {
        dlv_mmr tr;
        TRY(dlv_get_mmr(d, DR_TR, &tr));
        if (tr.limit < 0x67)
            return dlv_fail(d, "no usable TSS for a stack switch (TR limit 0x%llx)", tr.limit, 0);
        *base = tr.base;
        return DLV_OK;
    }

    /* An IDT interrupt or trap gate: 8 bytes in protected mode, 16 in long mode
       (SDM Vol. 3, 6.11 "IDT descriptors" and 6.14.1 "64-bit mode IDT"). */
    typedef struct { uint64_t offset; unsigned selector, type, ist; } dlv_gate;

    static int dlv_read_gate(pyvm_dlv *d, int vector, uint64_t size, dlv_gate *g) {
        dlv_mmr idtr;
        uint32_t w[4] = {0, 0, 0, 0};
        TRY(dlv_get_mmr(d, DR_IDTR, &idtr));
        if ((uint64_t)vector * size + size - 1 > idtr.limit)
            return dlv_fail(d, "vector 0x%llx beyond the IDT limit", vector, 0);
        TRY(dlv_read(d, idtr.base + (uint64_t)vector * size, w, size));
        g->type = (w[1] >> 8) & 0xF;
        if (!(w[1] & (1u << 15)))
            return dlv_fail(d, "IDT gate 0x%llx not present", vector, 0);
        if (g->type != 0xE && g->type != 0xF)
            return dlv_fail(d, "IDT gate 0x%llx has unsupported type 0x%llx", vector, g->type);
        g->offset = (w[0] & 0xFFFF) | (w[1] & 0xFFFF0000u);
        if (size == 16) g->offset |= (uint64_t)w[2] << 32;
        g->selector = w[0] >> 16;
        g->ist = size == 16 ? (w[1] & 7) : 0;
        return DLV_OK;
    }

    static int dlv_protected(pyvm_dlv *d, int vector, int has_code, uint64_t code, unsigned cpl) {
        dlv_gate gate;
        uint32_t words[6], frame[6];
        uint64_t flags, old_ss, esp, cs, eip, new_ss, new_esp, seg_base, new_flags, offset;
        unsigned gate_type, selector, new_cpl;
        int n = 0, i;
        TRY(dlv_read_gate(d, vector, 8, &gate));
        offset = gate.offset;
        selector = gate.selector;
        gate_type = gate.type;
        TRY(dlv_get(d, DR_EFLAGS, &flags));
        if (flags & EF_VM)
            return dlv_fail(d, "interrupt in virtual-8086 mode (unsupported)", 0, 0);
        new_cpl = selector & 3;
        TRY(dlv_get(d, DR_SS, &old_ss));
        TRY(dlv_get(d, DR_ESP, &esp));
        TRY(dlv_get(d, DR_CS, &cs));
        TRY(dlv_get(d, DR_EIP, &eip));
        if (new_cpl < cpl) {
            /* Inner-privilege stack from the 32-bit TSS: ESPn at 4 + 8n, SSn at 8 + 8n. */
            uint64_t tss;
            uint32_t st[2];
            TRY(dlv_tss_base(d, &tss));
            TRY(dlv_read(d, tss + 4 + 8 * (uint64_t)new_cpl, st, 8));
            new_esp = st[0];
            new_ss = st[1] & 0xFFFF;
            words[n++] = (uint32_t)old_ss;
            words[n++] = (uint32_t)esp;
        } else {
            new_ss = old_ss;
            new_esp = esp;
        }
        words[n++] = (uint32_t)flags;
        words[n++] = (uint32_t)cs;
        words[n++] = (uint32_t)eip;
        if (dlv_has_error_code(vector) && has_code)
            words[n++] = (uint32_t)code;
        new_esp = (new_esp - 4 * (uint64_t)n) & 0xFFFFFFFFull;
        /* The frame, lowest address first: [error code], EIP, CS, EFLAGS[, ESP, SS]. */
        for (i = 0; i < n; i++) frame[i] = words[n - 1 - i];
        TRY(dlv_segment_base(d, new_ss, &seg_base));
        TRY(dlv_write(d, seg_base + new_esp, frame, 4 * (uint64_t)n));
        if (new_cpl < cpl) {
            TRY(dlv_set_cpl(d, new_cpl));
            TRY(dlv_set(d, DR_CS, selector));
            TRY(dlv_set(d, DR_SS, new_ss));
        } else if (cpl) {
            TRY(dlv_set_cpl(d, cpl));          /* same privilege: back to where it was */
        }
        TRY(dlv_set(d, DR_ESP, new_esp));
        new_flags = flags & ~(uint64_t)(EF_TF | EF_NT | EF_RF | EF_VM);
        if (gate_type == 0xE) new_flags &= ~(uint64_t)EF_IF;
        TRY(dlv_set(d, DR_EFLAGS, new_flags));
        TRY(dlv_get(d, DR_CS, &cs));
        if (selector != cs) TRY(dlv_set(d, DR_CS, selector));
        TRY(dlv_set(d, DR_EIP, offset));
        return DLV_OK;
    }

    static int dlv_long(pyvm_dlv *d, int vector, int has_code, uint64_t code, unsigned cpl) {
        dlv_gate gate;
        uint64_t flags, rsp, rip, ss, cs, new_rsp, sp, offset, new_flags, words[6], frame[6];
        unsigned gate_type, selector, ist, new_cpl;
        int w = d->wide, n = 0, i;
        TRY(dlv_read_gate(d, vector, 16, &gate));
        offset = gate.offset;
        selector = gate.selector;
        gate_type = gate.type;
        ist = gate.ist;
        TRY(dlv_get(d, w ? DR_RFLAGS : DR_EFLAGS, &flags));
        TRY(dlv_get(d, w ? DR_RSP : DR_ESP, &rsp));
        TRY(dlv_get(d, w ? DR_RIP : DR_EIP, &rip));
        new_cpl = selector & 3;
        TRY(dlv_get(d, DR_SS, &ss));
        TRY(dlv_get(d, DR_CS, &cs));
        words[n++] = ss; words[n++] = rsp; words[n++] = flags; words[n++] = cs; words[n++] = rip;
        if (dlv_has_error_code(vector) && has_code)
            words[n++] = code;
        /* 64-bit TSS (SDM Vol. 3, 7.7): RSPn at 4 + 8n, ISTn at 36 + 8(n - 1). */
        if (ist || new_cpl < cpl) {
            uint64_t tss;
            TRY(dlv_tss_base(d, &tss));
            TRY(dlv_read(d, tss + (ist ? 36 + 8 * (uint64_t)(ist - 1) : 4 + 8 * (uint64_t)new_cpl),
                         &new_rsp, 8));
        } else {
            new_rsp = rsp;
        }
        sp = (new_rsp & ~0xFull) - 8 * (uint64_t)n;
        for (i = 0; i < n; i++) frame[i] = words[n - 1 - i];
        TRY(dlv_write(d, sp, frame, 8 * (uint64_t)n));
        if (new_cpl < cpl) {
            /* CPL first: Unicorn refuses a ring-0 CS or a null SS while CPL is 3. */
            TRY(dlv_set_cpl(d, new_cpl));
            TRY(dlv_set(d, DR_CS, selector));
            TRY(dlv_set(d, DR_SS, new_cpl));   /* a null SS with RPL = new CPL */
        } else if (cpl) {
            TRY(dlv_set_cpl(d, cpl));          /* same privilege: back to where it was */
        }
        TRY(dlv_set(d, w ? DR_RSP : DR_ESP, sp));
        new_flags = flags & ~(uint64_t)(EF_TF | EF_NT | EF_RF);
        if (gate_type == 0xE) new_flags &= ~(uint64_t)EF_IF;
        TRY(dlv_set(d, w ? DR_RFLAGS : DR_EFLAGS, new_flags));
        TRY(dlv_get(d, DR_CS, &cs));
        if (selector != cs) TRY(dlv_set(d, DR_CS, selector));
        TRY(dlv_set(d, w ? DR_RIP : DR_EIP, offset));
        return DLV_OK;
    }

    /* uc_cb_hookintr_t: record the exception and its error code (QEMU's raise_interrupt2
       stores it in env->error_code; Unicorn clears it when the instruction runs again)
       and end the run; the run loop delivers it. */
    static void pyvm_intr_hook(void *uc, uint32_t intno, void *user_data) {
        pyvm_dlv *d = (pyvm_dlv *)user_data;
        d->taken = 1;
        d->intno = (int)intno;
        d->ctx_err = d->ctx_save(uc, d->ctx);
        if (!d->ctx_err) {
            memcpy(&d->error_code, d->ctx + d->error_code_off, 4);
            memcpy(&d->is_int, d->ctx + d->is_int_off, 4);
        }
        d->emu_stop(uc);
    }

    typedef int (*pyvm_hook_add_t)(void *uc, size_t *hh, int type, void *callback,
                                   void *user_data, uint64_t begin, uint64_t end, ...);
    static int pyvm_intr_hook_add(uintptr_t fn, pyvm_dlv *d, size_t *hh) {
        /* UC_HOOK_INTR = 1 << 0 (unicorn.h, uc_hook_type); begin > end: every address */
        return ((pyvm_hook_add_t)fn)(d->uc, hh, 1, (void *)pyvm_intr_hook, d,
                                     (uint64_t)1, (uint64_t)0);
    }

    static void pyvm_set_emu_stop(pyvm_dlv *d, uintptr_t fn) {
        d->emu_stop = (int (*)(void *))fn;
    }

    typedef int (*pyvm_hook_del_t)(void *uc, size_t hh);
    static int pyvm_intr_hook_del(uintptr_t fn, pyvm_dlv *d, size_t hh) {
        return ((pyvm_hook_del_t)fn)(d->uc, hh);
    }

    /* No exception in flight (QEMU target/i386/seg_helper.c do_interrupt_all resets
       old_exception; Unicorn never runs it). */
    static int pyvm_clear_in_flight(pyvm_dlv *d) {
        uint32_t none = 0xFFFFFFFFu;
        int err = d->ctx_save(d->uc, d->ctx);
        if (err) return err;
        memcpy(d->ctx + d->old_exception_off, &none, 4);
        return d->ctx_restore(d->uc, d->ctx);
    }

    /* VCpu.stopped_at_hlt: 1 when the byte before the current instruction is HLT (0xF4),
       0 when not or unreadable, -err on a Unicorn error. */
    static int pyvm_stopped_at_hlt(pyvm_dlv *d) {
        uint64_t cr0, cs, pc, base, efer;
        uint8_t byte;
        int r;
        if (dlv_get(d, DR_CR0, &cr0) || dlv_get(d, DR_CS, &cs)
                || dlv_get(d, d->wide ? DR_RIP : DR_EIP, &pc) || dlv_efer(d, &efer))
            return -d->uc_err;
        if (!(cr0 & CR0_PE)) {
            base = cs << 4;
        } else if (efer & EFER_LMA) {
            base = 0;
        } else {
            r = dlv_segment_base(d, cs, &base);
            if (r == DLV_FAULT) return 0;
            if (r) return -d->uc_err;
        }
        r = dlv_read(d, base + pc - 1, &byte, 1);
        if (r == DLV_FAULT) return 0;
        if (r) return -d->uc_err;
        return byte == 0xF4;
    }

    /* The instruction pointer (RIP on a 64-bit engine, else EIP), as VCpu.pc. */
    static int pyvm_pc(pyvm_dlv *d, uint64_t *pc) {
        return dlv_get(d, d->wide ? DR_RIP : DR_EIP, pc) ? d->uc_err : 0;
    }

    /* EFLAGS.IF: 1 or 0, -err on a Unicorn error. */
    static int pyvm_interrupts_enabled(pyvm_dlv *d) {
        uint64_t flags;
        if (dlv_get(d, DR_EFLAGS, &flags)) return -d->uc_err;
        return (flags & EF_IF) != 0;
    }

    /* VCpu.deliver: one attempt, then #DF, then a triple fault (status DLV_FAULT with
       *failed = the vector whose delivery failed last and d->msg saying why). */
    static int pyvm_deliver(pyvm_dlv *d, int vector, int has_code, uint64_t code, int *failed) {
        int depth, r;
        for (depth = 0;; depth++) {
            uint64_t cr0, efer;
            unsigned cpl = 0;
            r = dlv_get(d, DR_CR0, &cr0);
            if (r == DLV_OK && !(cr0 & CR0_PE)) {
                r = dlv_real(d, vector);
            } else if (r == DLV_OK) {
                r = dlv_cpl(d, &cpl);
                /* The IDT, TSS and new stack are read as supervisor (SDM Vol. 3, 4.6.1
                   "implicit supervisor-mode accesses"): page walks run at CPL 0. */
                if (r == DLV_OK && cpl) r = dlv_set_cpl(d, 0);
                if (r == DLV_OK) r = dlv_efer(d, &efer);
                if (r == DLV_OK)
                    r = (efer & EFER_LMA) ? dlv_long(d, vector, has_code, code, cpl)
                                          : dlv_protected(d, vector, has_code, code, cpl);
            }
            if (r != DLV_FAULT) return r;
            if (cpl) {
                int r2 = dlv_set_cpl(d, cpl);
                if (r2) return r2;
            }
            if (depth >= 1 || vector == 8) { *failed = vector; return DLV_FAULT; }
            vector = 8;                     /* double fault, error code 0 */
            has_code = 1;
            code = 0;
        }
    }
    """
    ctypedef int (*pyvm_reg_fn)(void *uc, int regid, void *value)
    ctypedef int (*pyvm_vmem_fn)(void *uc, uint64_t addr, int prot, uint64_t *pa)
    ctypedef int (*pyvm_ctx_fn)(void *uc, void *ctx)
    enum: DR_NREGS
    enum: DLV_MAX_BLOCKS
    ctypedef struct pyvm_ram_block:
        uint64_t gpa
        uint64_t size
        uint8_t *host
        uint64_t *bitmap
    ctypedef struct pyvm_dlv:
        void *uc
        pyvm_reg_fn reg_read
        pyvm_reg_fn reg_write
        pyvm_vmem_fn translate
        pyvm_ctx_fn ctx_save
        pyvm_ctx_fn ctx_restore
        uint8_t *ctx
        uint64_t hflags_off
        int wide
        int regs[DR_NREGS]
        int nblocks
        pyvm_ram_block blocks[DLV_MAX_BLOCKS]
        int uc_err
        char msg[192]
        uint64_t error_code_off
        uint64_t is_int_off
        uint64_t old_exception_off
        int taken
        int intno
        int ctx_err
        uint32_t error_code
        uint32_t is_int
    int pyvm_intr_hook_add(uintptr_t fn, pyvm_dlv *d, size_t *hh)
    int pyvm_intr_hook_del(uintptr_t fn, pyvm_dlv *d, size_t hh)
    void pyvm_set_emu_stop(pyvm_dlv *d, uintptr_t fn)
    int pyvm_clear_in_flight(pyvm_dlv *d)
    int pyvm_stopped_at_hlt(pyvm_dlv *d)
    int pyvm_interrupts_enabled(pyvm_dlv *d)
    int pyvm_pc(pyvm_dlv *d, uint64_t *pc)
    int pyvm_deliver(pyvm_dlv *d, int vector, int has_code, uint64_t code, int *failed)

IMPLEMENTATION = "cython"
# The register ids Delivery takes, in this order (names as in unicorn.x86_const).
REGISTERS = ("EFLAGS", "RFLAGS", "EIP", "RIP", "ESP", "RSP", "CS", "SS", "CR0",
             "IDTR", "GDTR", "TR", "MSR")
MAX_BLOCKS = DLV_MAX_BLOCKS
OK, FAULT, UNICORN_ERROR = 0, 1, 2


cdef class Delivery:
    """Interrupt and exception delivery for one Unicorn x86 engine.

    ``functions``: addresses of uc_reg_read, uc_reg_write, uc_vmem_translate,
    uc_context_save, uc_context_restore; ``context``: a uc_context of this engine (kept
    alive by the caller) whose ``hflags`` is at ``hflags_offset``; ``blocks``: (gpa,
    size, host address, dirty bitmap words address) of each RAM block.
    """

    cdef pyvm_dlv *_d
    cdef object _keep
    cdef size_t _hh
    cdef uintptr_t _hook_del
    cdef readonly bint hooked

    def __cinit__(self, uintptr_t uc_handle, tuple functions, uintptr_t context,
                  uint64_t hflags_offset, bint wide, tuple register_ids, list blocks,
                  object keep=None):
        cdef int i
        if len(functions) != 5:
            raise ValueError("five Unicorn functions expected")
        if len(register_ids) != len(REGISTERS):
            raise ValueError(f"{len(REGISTERS)} register ids expected")
        if len(blocks) > DLV_MAX_BLOCKS:
            raise ValueError(f"at most {DLV_MAX_BLOCKS} RAM blocks")
        self._d = <pyvm_dlv *>calloc(1, sizeof(pyvm_dlv))
        if self._d == NULL:
            raise MemoryError()
        self._keep = keep
        self._d.uc = <void *>uc_handle
        self._d.reg_read = <pyvm_reg_fn><uintptr_t>functions[0]
        self._d.reg_write = <pyvm_reg_fn><uintptr_t>functions[1]
        self._d.translate = <pyvm_vmem_fn><uintptr_t>functions[2]
        self._d.ctx_save = <pyvm_ctx_fn><uintptr_t>functions[3]
        self._d.ctx_restore = <pyvm_ctx_fn><uintptr_t>functions[4]
        self._d.ctx = <uint8_t *>context
        self._d.hflags_off = hflags_offset
        self._d.wide = wide
        for i in range(len(REGISTERS)):
            self._d.regs[i] = register_ids[i]
        self._d.nblocks = len(blocks)
        for i, (gpa, size, host, bitmap) in enumerate(blocks):
            self._d.blocks[i].gpa = gpa
            self._d.blocks[i].size = size
            self._d.blocks[i].host = <uint8_t *><uintptr_t>host
            self._d.blocks[i].bitmap = <uint64_t *><uintptr_t>bitmap

    def hook_exceptions(self, uintptr_t hook_add_fn, uintptr_t hook_del_fn,
                        uintptr_t emu_stop_fn, uint64_t error_code_offset,
                        uint64_t is_int_offset, uint64_t old_exception_offset):
        """Register the C exception hook (UC_HOOK_INTR) on the engine; :meth:`take`
        returns what it saw.  The offsets are those of QEMU's ``error_code``,
        ``exception_is_int`` and ``old_exception`` in the context."""
        if self.hooked:
            raise RuntimeError("the exception hook is already registered")
        self._d.error_code_off = error_code_offset
        self._d.is_int_off = is_int_offset
        self._d.old_exception_off = old_exception_offset
        pyvm_set_emu_stop(self._d, emu_stop_fn)
        cdef int err = pyvm_intr_hook_add(hook_add_fn, self._d, &self._hh)
        if err != 0:
            raise RuntimeError(f"uc_hook_add failed with Unicorn error {err}")
        self._hook_del = hook_del_fn
        self.hooked = True

    def unhook_exceptions(self):
        cdef int err
        if self.hooked:
            self.hooked = False
            err = pyvm_intr_hook_del(self._hook_del, self._d, self._hh)
            if err != 0:
                raise RuntimeError(f"uc_hook_del failed with Unicorn error {err}")

    def take(self):
        """The exception hooked since the last call as (vector, error code, raised by
        ``int n``), or None; a failed context read is (vector, None, False) plus
        ``UNICORN_ERROR`` in :attr:`hook_error`."""
        if not self._d.taken:
            return None
        self._d.taken = 0
        if self._d.ctx_err:
            return self._d.intno, 0, False
        return self._d.intno, self._d.error_code, bool(self._d.is_int)

    @property
    def hook_error(self):
        """The Unicorn error of the hook's last context read (0: none)."""
        return self._d.ctx_err

    def clear_in_flight(self):
        """No exception in flight (see ExceptionState.clear_in_flight); 0 or a Unicorn error."""
        return pyvm_clear_in_flight(self._d)

    def stopped_at_hlt(self):
        """1 when the instruction before the current one is HLT, 0 when not (or when it
        cannot be read), -err on a Unicorn error (VCpu.stopped_at_hlt_python's twin)."""
        return pyvm_stopped_at_hlt(self._d)

    def pc(self):
        """VCpu.pc without ctypes (which would give the GIL away and back at every run):
        the instruction pointer, or -err on a Unicorn error."""
        cdef uint64_t value = 0
        cdef int err = pyvm_pc(self._d, &value)
        return -err if err else value

    def interrupts_enabled(self):
        """EFLAGS.IF as 1 or 0, -err on a Unicorn error."""
        return pyvm_interrupts_enabled(self._d)

    def deliver(self, int vector, object error_code):
        """Deliver ``vector`` (error code or None).  Returns (status, detail, message):
        (OK, 0, ""), (FAULT, failed vector, why: a triple fault), (UNICORN_ERROR, err, "")."""
        cdef int failed = 0, r
        cdef int has_code = error_code is not None
        cdef uint64_t code = (error_code & 0xFFFFFFFFFFFFFFFF) if has_code else 0
        # The GIL stays held: the call takes microseconds, and giving the GIL away could
        # leave the vCPU thread waiting a whole switch interval to get it back.
        r = pyvm_deliver(self._d, vector, has_code, code, &failed)
        if r == OK:
            return OK, 0, ""
        if r == FAULT:
            return FAULT, failed, self._d.msg.decode("ascii", "replace")
        return UNICORN_ERROR, self._d.uc_err, ""

    def __dealloc__(self):
        free(self._d)
