/*
 * torture.s - the CPU-state migration guest (ELF32; loaded at 1 MiB, runs from 0x10000,
 * see reloc32.s).  Only vCPU 0 works; other vCPUs halt.
 *
 * 1. Puts every register it can reach to an unusual value:
 *    - FS loaded from a descriptor (base 0x123450, limit 0x54321) that is then wiped
 *      from the GDT; GS loaded from an LDT whose GDT descriptor is then wiped, so only
 *      the hidden LDTR base still finds it; TR from a 32-bit TSS (the CPU marks it busy);
 *    - a trip through real mode that loads ES = 0x1234 and SS = 0 and returns to
 *      protected mode reloading only DS: ES keeps base 0x12340 with a 4 GiB limit
 *      (unreal mode) and SS is null in protected mode with base 0, limit 4 GiB;
 *    - CR0 (MP NE WP AM), CR2, CR3, CR4 (DE PCE OSFXSR OSXMMEXCPT), EFER.SCE, STAR,
 *      LSTAR, CSTAR, SFMASK, KERNEL_GS_BASE, SYSENTER_CS/ESP/EIP, PAT, TSC_AUX;
 *    - DR0-DR3, DR6, DR7; an x87 stack of five values (one an odd 80-bit pattern) with
 *      FCW 0x0b7f; MXCSR 0x7f80; XMM0-7; the GPRs and EFLAGS (DF, AC, arithmetic flags).
 *    Prints "torture: set", records every register ("before"), then spins without
 *    touching any flag or register but ECX (LOOP/JECXZ/LEA/XCHG) for `spin=N` x 2^24
 *    rounds (default 64).
 * 2. Records every register again ("after"), prints "torture: check" and compares:
 *    after == before field by field, after == the values set in step 1 for the ones
 *    fixed by this program, and the hidden segment bases through their effect (stores
 *    through ES/FS/GS/SS land at the cached bases; GS reloads from the LDT through the
 *    hidden LDTR base).  The TSC must not have gone back.  Hidden limits and attributes
 *    are invisible to guest code under Unicorn (QEMU's TCG checks no segment limits);
 *    the test compares them with `info registers` on both sides.
 *    Prints "torture: pass" and exits with 0x10 (pyvm status 0x21), or
 *    "torture: FAIL <what>" and exits with 0x7f (status 0xff).
 * Migrate it between "set" and "check" and step 2 runs on the destination.
 */
        .set SEL_CODE, 0x08
        .set SEL_DATA, 0x10
        .set SEL_CODE16, 0x18           /* 16-bit code, based at to_real */
        .set SEL_DATA16, 0x20
        .set SEL_ODD, 0x28              /* FS's descriptor, wiped after loading */
        .set SEL_LDT, 0x30              /* the LDT's descriptor, wiped after LLDT */
        .set SEL_TSS, 0x38
        .set SEL_LDT_DATA, 0x04         /* LDT entry 0, TI = 1 */

        .set FS_BASE, 0x00123450
        .set FS_LIMIT, 0x54321
        .set GS_BASE, 0x00234560
        .set ES_SEL, 0x1234
        .set ES_BASE, ES_SEL << 4

        .set EXIT_PASS, 0x10
        .set EXIT_FAIL, 0x7f
        .set INNER, 0x01000000

        /* A register record: offsets */
        .set R_EAX, 0
        .set R_EBX, 4
        .set R_ECX, 8
        .set R_EDX, 12
        .set R_ESI, 16
        .set R_EDI, 20
        .set R_EBP, 24
        .set R_ESP, 28
        .set R_EFLAGS, 32
        .set R_SEGS, 36                 /* cs ds es fs gs ss ldtr tr, a dword each */
        .set R_GDTR, 68                 /* 8 bytes: limit, base, 0 */
        .set R_IDTR, 76
        .set R_CR, 84                   /* cr0 cr2 cr3 cr4 */
        .set R_DR, 100                  /* dr0 dr1 dr2 dr3 dr6 dr7 */
        .set R_MSR, 124                 /* 11 MSRs, 8 bytes each, order of msr_list */
        .set R_FPU, 212                 /* FNSAVE image, 108 bytes */
        .set R_MXCSR, 320
        .set R_XMM, 336                 /* 16-byte aligned, 8 x 16 */
        .set R_TSC, 464
        .set R_SIZE, 480

        .macro SEG_TO reg, off, rec
        xor %eax, %eax
        mov \reg, %ax
        mov %eax, \rec + \off
        .endm

        .macro MSR_TO index, off, rec
        mov $\index, %ecx
        rdmsr
        mov %eax, \rec + \off
        mov %edx, \rec + \off + 4
        .endm

/*
 * RECORD rec: store every register into the record, then put back every one it used
 * (GPRs, EFLAGS, the FPU through FRSTOR).  Stack use: one dword below ESP.
 */
        .macro RECORD rec
        mov %eax, \rec + R_EAX
        mov %ebx, \rec + R_EBX
        mov %ecx, \rec + R_ECX
        mov %edx, \rec + R_EDX
        mov %esi, \rec + R_ESI
        mov %edi, \rec + R_EDI
        mov %ebp, \rec + R_EBP
        mov %esp, \rec + R_ESP
        pushf
        popl \rec + R_EFLAGS
        SEG_TO %cs, R_SEGS + 0, \rec
        SEG_TO %ds, R_SEGS + 4, \rec
        SEG_TO %es, R_SEGS + 8, \rec
        SEG_TO %fs, R_SEGS + 12, \rec
        SEG_TO %gs, R_SEGS + 16, \rec
        SEG_TO %ss, R_SEGS + 20, \rec
        xor %eax, %eax
        sldt %ax
        mov %eax, \rec + R_SEGS + 24
        str %ax
        mov %eax, \rec + R_SEGS + 28
        sgdt \rec + R_GDTR
        sidt \rec + R_IDTR
        mov %cr0, %eax
        mov %eax, \rec + R_CR + 0
        mov %cr2, %eax
        mov %eax, \rec + R_CR + 4
        mov %cr3, %eax
        mov %eax, \rec + R_CR + 8
        mov %cr4, %eax
        mov %eax, \rec + R_CR + 12
        mov %dr0, %eax
        mov %eax, \rec + R_DR + 0
        mov %dr1, %eax
        mov %eax, \rec + R_DR + 4
        mov %dr2, %eax
        mov %eax, \rec + R_DR + 8
        mov %dr3, %eax
        mov %eax, \rec + R_DR + 12
        mov %dr6, %eax
        mov %eax, \rec + R_DR + 16
        mov %dr7, %eax
        mov %eax, \rec + R_DR + 20
        MSR_TO 0xc0000080, R_MSR + 0, \rec      /* EFER */
        MSR_TO 0xc0000081, R_MSR + 8, \rec      /* STAR */
        MSR_TO 0xc0000082, R_MSR + 16, \rec     /* LSTAR */
        MSR_TO 0xc0000083, R_MSR + 24, \rec     /* CSTAR */
        MSR_TO 0xc0000084, R_MSR + 32, \rec     /* SFMASK */
        MSR_TO 0xc0000102, R_MSR + 40, \rec     /* KERNEL_GS_BASE */
        MSR_TO 0x174, R_MSR + 48, \rec          /* SYSENTER_CS */
        MSR_TO 0x175, R_MSR + 56, \rec          /* SYSENTER_ESP */
        MSR_TO 0x176, R_MSR + 64, \rec          /* SYSENTER_EIP */
        MSR_TO 0x277, R_MSR + 72, \rec          /* PAT */
        MSR_TO 0xc0000103, R_MSR + 80, \rec     /* TSC_AUX */
        fnsave \rec + R_FPU
        frstor \rec + R_FPU
        stmxcsr \rec + R_MXCSR
        movdqa %xmm0, \rec + R_XMM + 0
        movdqa %xmm1, \rec + R_XMM + 16
        movdqa %xmm2, \rec + R_XMM + 32
        movdqa %xmm3, \rec + R_XMM + 48
        movdqa %xmm4, \rec + R_XMM + 64
        movdqa %xmm5, \rec + R_XMM + 80
        movdqa %xmm6, \rec + R_XMM + 96
        movdqa %xmm7, \rec + R_XMM + 112
        rdtsc
        mov %eax, \rec + R_TSC
        mov %edx, \rec + R_TSC + 4
        pushl \rec + R_EFLAGS
        popf
        mov \rec + R_EAX, %eax
        mov \rec + R_ECX, %ecx
        mov \rec + R_EDX, %edx
        .endm

        .code32
        .text
        .globl main
main:                                   /* EBX = index, ECX = count, ESI = command line */
        test %ebx, %ebx
        jnz halt_forever
        mov $64, %eax
        mov $key_spin, %edi
        call cmdline_get
        mov %eax, spin_outer

        /* Our GDT, with the LDT and TSS descriptors filled in at run time. */
        mov $ldt, %eax
        mov $tgdt + SEL_LDT, %edi
        call set_desc_base
        mov $tss, %eax
        mov $tgdt + SEL_TSS, %edi
        call set_desc_base
        lgdt tgdt_desc
        ljmp $SEL_CODE, $1f
1:      mov $SEL_DATA, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov $SEL_ODD, %ax
        mov %ax, %fs
        mov $SEL_LDT, %ax
        lldt %ax
        mov $SEL_LDT_DATA, %ax
        mov %ax, %gs
        mov $SEL_TSS, %ax
        ltr %ax
        movl $0, tgdt + SEL_ODD         /* no descriptor holds FS's base or limit now */
        movl $0, tgdt + SEL_ODD + 4
        movl $0, tgdt + SEL_LDT         /* nor the LDT's: only LDTR's hidden part */
        movl $0, tgdt + SEL_LDT + 4

        /*
         * Real mode and back: ES = 0x1234 and SS = 0 keep their 4 GiB limits.  The 16-bit
         * code segment and the real-mode CS both start at to_real (16-byte aligned).
         */
        mov $to_real, %eax
        mov $tgdt + SEL_CODE16, %edi
        call set_desc_base
        mov $to_real, %eax
        shr $4, %eax
        mov %ax, real_ptr + 2
        ljmp $SEL_CODE16, $0
        .code16
        .balign 16
to_real:
        mov %cr0, %eax
        and $~1, %eax
        mov %eax, %cr0
        ljmp *%cs:(real_ptr - to_real)
real_ptr:
        .word in_real - to_real, 0      /* offset, segment (set at run time) */
in_real:
        mov $ES_SEL, %ax
        mov %ax, %es
        xor %ax, %ax
        mov %ax, %ss
        mov %cr0, %eax
        or $1, %eax
        mov %eax, %cr0
        ljmpl $SEL_CODE, $back_in_pm
        .code32
back_in_pm:
        mov $SEL_DATA, %ax
        mov %ax, %ds                    /* only DS: SS stays null, ES unreal */

        mov %cr0, %eax                  /* MP NE WP AM */
        or $0x00050022, %eax
        mov %eax, %cr0
        mov $0xdeadbee0, %eax
        mov %eax, %cr2
        mov $0x00abc000, %eax
        mov %eax, %cr3
        mov %cr4, %eax                  /* DE PCE OSFXSR OSXMMEXCPT */
        or $0x00000708, %eax
        mov %eax, %cr4
        mov $0xc0000080, %ecx           /* EFER.SCE */
        rdmsr
        or $1, %eax
        wrmsr
        mov $msr_values, %esi
2:      mov (%esi), %ecx
        test %ecx, %ecx
        jz 3f
        mov 4(%esi), %eax
        mov 8(%esi), %edx
        wrmsr
        add $12, %esi
        jmp 2b
3:      mov $0x11111110, %eax
        mov %eax, %dr0
        mov $0x22222220, %eax
        mov %eax, %dr1
        mov $0x33333330, %eax
        mov %eax, %dr2
        mov $0x44444440, %eax
        mov %eax, %dr3
        mov $0xffff0ff5, %eax
        mov %eax, %dr6
        mov $0x00000300, %eax           /* LE GE, no breakpoint enabled */
        mov %eax, %dr7

        finit
        fldcw fcw_value
        fldt odd80
        fld1
        fldpi
        fldz
        fldl2t
        ldmxcsr mxcsr_value
        movdqa xmm_values + 0, %xmm0
        movdqa xmm_values + 16, %xmm1
        movdqa xmm_values + 32, %xmm2
        movdqa xmm_values + 48, %xmm3
        movdqa xmm_values + 64, %xmm4
        movdqa xmm_values + 80, %xmm5
        movdqa xmm_values + 96, %xmm6
        movdqa xmm_values + 112, %xmm7

        mov $msg_set, %esi
        call serial_puts
        mov gpr_values + 0, %eax
        mov gpr_values + 4, %ebx
        mov gpr_values + 8, %edx
        mov gpr_values + 12, %esi
        mov gpr_values + 16, %edi
        mov gpr_values + 20, %ebp
        pushl eflags_value
        popf
        RECORD before

        /* Spin: only ECX changes, and no flag (LOOP, JECXZ, LEA and XCHG set none). */
spin:   mov $INNER, %ecx
1:      loop 1b
        xchg %ecx, spin_outer
        jecxz spun
        lea -1(%ecx), %ecx
        xchg %ecx, spin_outer
        jmp spin
spun:
        RECORD after
        cld
        mov $msg_check, %esi
        call serial_puts

        /* after == before, field by field (the TSC aside). */
        mov $same_table, %ebx
4:      mov (%ebx), %ecx                /* byte count, 0 ends */
        jecxz 5f
        mov 4(%ebx), %esi
        lea before(%esi), %edi
        lea after(%esi), %esi
        call memeq
        jne fail_ebx
        add $12, %ebx
        jmp 4b
        /* after == what this program set. */
5:      mov $want_table, %ebx
6:      mov (%ebx), %ecx
        jecxz 7f
        mov 4(%ebx), %esi
        lea after(%esi), %esi
        mov 12(%ebx), %edi
        call memeq
        jne fail_ebx
        add $16, %ebx
        jmp 6b
7:      mov after + R_TSC + 4, %eax     /* the TSC never went back */
        cmp before + R_TSC + 4, %eax
        ja 8f
        jb fail_tsc
        mov after + R_TSC, %eax
        cmp before + R_TSC, %eax
        jb fail_tsc
8:
        /* The hidden segment state, through its effect. */
        movl $0x5a5a1234, %es:0x100
        cmpl $0x5a5a1234, ES_BASE + 0x100
        jne fail_es
        movl $0x3c3c5678, %fs:(FS_LIMIT - 3)
        cmpl $0x3c3c5678, FS_BASE + FS_LIMIT - 3
        jne fail_fs
        movl $0x0f0f9abc, %gs:0x10
        cmpl $0x0f0f9abc, GS_BASE + 0x10
        jne fail_gs
        mov $SEL_LDT_DATA, %ax          /* from the LDT, found through LDTR's base only */
        mov %ax, %gs
        movl $0x1e1e2d2d, %gs:0x20
        cmpl $0x1e1e2d2d, GS_BASE + 0x20
        jne fail_ldt
        pushl $0x77665544               /* SS: null selector, base 0, 4 GiB */
        mov %esp, %ebx
        cmpl $0x77665544, (%ebx)        /* DS-relative: the same byte if SS's base is 0 */
        jne fail_ss
        add $4, %esp

        mov $msg_pass, %esi
        call serial_puts
        mov $EXIT_PASS, %al
        jmp debug_exit

fail_tsc:
        mov $name_tsc, %esi
        jmp fail
fail_es:
        mov $name_es_hidden, %esi
        jmp fail
fail_fs:
        mov $name_fs_hidden, %esi
        jmp fail
fail_gs:
        mov $name_gs_hidden, %esi
        jmp fail
fail_ldt:
        mov $name_ldtr_hidden, %esi
        jmp fail
fail_ss:
        mov $name_ss_hidden, %esi
        jmp fail
fail_ebx:
        mov 8(%ebx), %esi
fail:   cld
        push %esi
        mov $msg_fail, %esi
        call serial_puts
        pop %esi
        call serial_puts
        call serial_newline
        mov $EXIT_FAIL, %al
        jmp debug_exit

/* memeq: ZF = the ECX bytes at ESI equal those at EDI, both through DS (CMPS would
 * read through ES, which holds the unreal segment under test).  Clobbers AL, ECX,
 * ESI, EDI. */
memeq:  jecxz 2f
1:      mov (%esi), %al
        cmp (%edi), %al
        jne 2f
        inc %esi
        inc %edi
        loop 1b
        xor %eax, %eax                  /* ZF = 1 */
2:      ret

/* set_desc_base: put base EAX into the descriptor at EDI.  Clobbers EAX. */
set_desc_base:
        mov %ax, 2(%edi)
        shr $16, %eax
        mov %al, 4(%edi)
        mov %ah, 7(%edi)
        ret

        .data
        .balign 8
tgdt:
        .quad 0
        .quad 0x00cf9b000000ffff        /* 0x08: code, base 0, 4 GiB, 32-bit */
        .quad 0x00cf93000000ffff        /* 0x10: data, base 0, 4 GiB */
        .quad 0x00009b000000ffff        /* 0x18: code, 64 KiB, 16-bit (base set at run time) */
        .quad 0x000093000000ffff        /* 0x20: data, base 0, 64 KiB, 16-bit */
        .quad 0x0015f31234504321        /* 0x28: data, base 0x123450, limit 0x54321, AVL, DPL 3 */
        .quad 0x0000820000000017        /* 0x30: LDT, 3 entries (base set at run time) */
        .quad 0x0000890000000067        /* 0x38: 32-bit TSS (base set at run time) */
tgdt_end:
        .balign 4
        .word 0
tgdt_desc:
        .word tgdt_end - tgdt - 1
        .long tgdt

        .balign 8
ldt:    .quad 0x00cf93234560ffff        /* 0x04: data, base 0x234560, 4 GiB */
        .quad 0
        .quad 0

        .balign 4
spin_outer:
        .long 0

        .section .rodata
        .globl guest_name
guest_name:     .asciz "torture"
key_spin:       .asciz "spin="
msg_set:        .asciz "torture: set\r\n"
msg_check:      .asciz "torture: check\r\n"
msg_pass:       .asciz "torture: pass\r\n"
msg_fail:       .asciz "torture: FAIL "

        .balign 4
/* (MSR, low, high), 0 ends */
msr_values:
        .long 0xc0000081, 0xdead0000, 0x00230010        /* STAR */
        .long 0xc0000082, 0x12345678, 0xffff8000        /* LSTAR */
        .long 0xc0000083, 0x9abcdef0, 0xffff8000        /* CSTAR */
        .long 0xc0000084, 0x00047700, 0x00000000        /* SFMASK */
        .long 0xc0000102, 0x0abcd000, 0xffff8880        /* KERNEL_GS_BASE */
        .long 0x174, 0x00000010, 0x00000000             /* SYSENTER_CS */
        .long 0x175, 0xcafe0000, 0x00000001             /* SYSENTER_ESP */
        .long 0x176, 0x00fedcba, 0x00000002             /* SYSENTER_EIP */
        .long 0x277, 0x00070106, 0x00070106             /* PAT */
        .long 0xc0000103, 0xbeef0042, 0x00000012        /* TSC_AUX */
        .long 0
gpr_values:
        .long 0xa5a5a5a5, 0x01234567, 0x89abcdef, 0xfedcba98, 0x76543210, 0x0badf00d
eflags_value:
        .long 0x00040cd7                /* AC DF OF SF ZF AF PF CF */
fcw_value:
        .word 0x0b7f                    /* RC up, 64-bit precision, all masked */
        .balign 4
mxcsr_value:
        .long 0x00007f80                /* RC toward zero, all masked */
        .balign 16
odd80:  .quad 0xc90fdaa22168c235        /* 64 mantissa bits (no double holds them) */
        .word 0x4abc                    /* and an exponent beyond a double's range */
        .balign 16
xmm_values:
        .irp i, 0,1,2,3,4,5,6,7
        .quad 0x0123456789abcdef + \i * 0x1111111111111111, 0xfedcba9876543210 - \i * 0x0101010101010101
        .endr
seg_values:                             /* cs ds es fs gs ss ldtr tr, as RECORD stores them */
        .long SEL_CODE, SEL_DATA, ES_SEL, SEL_ODD, SEL_LDT_DATA, 0, SEL_LDT, SEL_TSS
cr_values:
        .long 0xdeadbee0, 0x00abc000
dr_values:
        .long 0x11111110, 0x22222220, 0x33333330, 0x44444440

/* (bytes, record offset, name): after must equal before */
same_table:
        .long 4, R_EAX, name_eax
        .long 4, R_EBX, name_ebx
        .long 4, R_EDX, name_edx
        .long 4, R_ESI, name_esi
        .long 4, R_EDI, name_edi
        .long 4, R_EBP, name_ebp
        .long 4, R_ESP, name_esp
        .long 4, R_EFLAGS, name_eflags
        .long 32, R_SEGS, name_selectors
        .long 8, R_GDTR, name_gdtr
        .long 8, R_IDTR, name_idtr
        .long 16, R_CR, name_cr
        .long 24, R_DR, name_dr
        .long 8, R_MSR + 0, name_efer
        .long 80, R_MSR + 8, name_msrs
        .long 12, R_FPU, name_fpu_env           /* FCW, FSW (TOP), FTW */
        .long 80, R_FPU + 28, name_fpu_stack
        .long 4, R_MXCSR, name_mxcsr
        .long 128, R_XMM, name_xmm
        .long 0
/* (bytes, record offset, name, expected value) */
want_table:
        .long 8, R_EAX, name_gprs_set, gpr_values
        .long 16, R_EDX, name_gprs_set, gpr_values + 8
        .long 4, R_EFLAGS, name_eflags_set, eflags_value
        .long 32, R_SEGS, name_selectors_set, seg_values
        .long 8, R_CR + 4, name_cr_set, cr_values
        .long 16, R_DR, name_dr_set, dr_values
        .long 8, R_MSR + 8, name_star_set, msr_values + 4
        .long 8, R_MSR + 16, name_lstar_set, msr_values + 16
        .long 8, R_MSR + 24, name_cstar_set, msr_values + 28
        .long 8, R_MSR + 32, name_sfmask_set, msr_values + 40
        .long 8, R_MSR + 40, name_kgsbase_set, msr_values + 52
        .long 8, R_MSR + 48, name_sysenter_set, msr_values + 64
        .long 8, R_MSR + 56, name_sysenter_set, msr_values + 76
        .long 8, R_MSR + 64, name_sysenter_set, msr_values + 88
        .long 8, R_MSR + 72, name_pat_set, msr_values + 100
        .long 8, R_MSR + 80, name_tsc_aux_set, msr_values + 112
        .long 4, R_MXCSR, name_mxcsr_set, mxcsr_value
        .long 128, R_XMM, name_xmm_set, xmm_values
        .long 0

name_eax:       .asciz "eax"
name_ebx:       .asciz "ebx"
name_edx:       .asciz "edx"
name_esi:       .asciz "esi"
name_edi:       .asciz "edi"
name_ebp:       .asciz "ebp"
name_esp:       .asciz "esp"
name_eflags:    .asciz "eflags"
name_selectors: .asciz "segment selectors / ldtr / tr"
name_gdtr:      .asciz "gdtr"
name_idtr:      .asciz "idtr"
name_cr:        .asciz "cr0/cr2/cr3/cr4"
name_dr:        .asciz "dr0-3/dr6/dr7"
name_efer:      .asciz "efer"
name_msrs:      .asciz "star/lstar/cstar/sfmask/kernel_gs_base/sysenter/pat/tsc_aux"
name_fpu_env:   .asciz "fcw/fsw/ftw"
name_fpu_stack: .asciz "x87 registers"
name_mxcsr:     .asciz "mxcsr"
name_xmm:       .asciz "xmm0-7"
name_gprs_set:  .asciz "gprs not as set"
name_eflags_set: .asciz "eflags not as set"
name_selectors_set: .asciz "selectors not as set"
name_cr_set:    .asciz "cr2/cr3 not as set"
name_dr_set:    .asciz "dr0-3 not as set"
name_star_set:  .asciz "star not as set"
name_lstar_set: .asciz "lstar not as set"
name_cstar_set: .asciz "cstar not as set"
name_sfmask_set: .asciz "sfmask not as set"
name_kgsbase_set: .asciz "kernel_gs_base not as set"
name_sysenter_set: .asciz "sysenter msrs not as set"
name_pat_set:   .asciz "pat not as set"
name_tsc_aux_set: .asciz "tsc_aux not as set"
name_mxcsr_set: .asciz "mxcsr not as set"
name_xmm_set:   .asciz "xmm not as set"
name_tsc:       .asciz "tsc went backwards"
name_es_hidden: .asciz "es hidden base"
name_fs_hidden: .asciz "fs hidden base/limit"
name_gs_hidden: .asciz "gs hidden base"
name_ldtr_hidden: .asciz "ldtr hidden base"
name_ss_hidden: .asciz "ss hidden base"

        .bss
        .balign 16
before: .skip R_SIZE
        .balign 16
after:  .skip R_SIZE
        .balign 16
tss:    .skip 104
