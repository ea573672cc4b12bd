/*
 * ab.s - the A-B migration test guest (ELF32, SMP aware; loaded at 1 MiB, runs from
 * 0x10000, see reloc32.s).
 *
 * Every vCPU prints "A" once, then forever increments the first byte of each 4 KiB
 * page of its own slice of a RAM range, in ascending order, printing "B" after every
 * `passes` full passes over its slice.  A page's byte changes in one instruction and
 * pages are visited in order, so at any instant the first bytes of a slice are either
 * all x, or x+1 for its first k pages and x for the rest (mod 256).
 *
 * The range is split by vCPU index: each vCPU gets pages/count pages in index order,
 * the last one also the remainder.  A vCPU with an empty slice prints "A" and halts.
 * -append: start=N (MiB, default 1), size=N (MiB, default 16), passes=N (default 1).
 * A bad range prints "ab: bad start/size" and exits with 0x7d.
 */
        .set START_DEFAULT, 1
        .set SIZE_DEFAULT, 16
        .set PAGE_SIZE, 4096
        .set EXIT_BAD_PARAMS, 0x7d

        .code32
        .text
        .globl main
main:                                   /* EBX = index, ECX = count, ESI = command line */
        push %ecx                       /* 8(%esp): vCPU count */
        push %ebx                       /* 4(%esp): vCPU index */
        mov $1, %eax
        mov $key_passes, %edi
        call cmdline_get
        test %eax, %eax
        jnz 1f
        inc %eax
1:      push %eax                       /* 0(%esp): passes per "B" */
        mov $START_DEFAULT, %eax
        mov $SIZE_DEFAULT, %edx
        call range_from_cmdline
        jc bad_params
        mov %eax, %edi                  /* EDI = range start */
        sub %eax, %edx
        shr $12, %edx
        mov %edx, %eax                  /* EAX = pages in the range */
        xor %edx, %edx
        divl 8(%esp)                    /* EAX = pages per vCPU, EDX = remainder */
        mov %eax, %ecx                  /* ECX = pages in this slice */
        mov 4(%esp), %ebx
        lea 1(%ebx), %esi
        cmp 8(%esp), %esi
        jne 2f
        add %edx, %ecx                  /* the last vCPU takes the remainder */
2:      imul %ebx, %eax
        shl $12, %eax
        add %eax, %edi                  /* EDI = slice start */
        pop %ebp                        /* EBP = passes per "B" */
        add $8, %esp

        mov $'A', %al
        call serial_putc
        test %ecx, %ecx
        jz halt_forever
        mov %ebp, %edx                  /* EDX = passes left until the next "B" */
pass:
        mov %edi, %esi
        mov %ecx, %ebx
1:      incb (%esi)
        add $PAGE_SIZE, %esi
        dec %ebx
        jnz 1b
        dec %edx
        jnz pass
        mov $'B', %al
        call serial_putc
        mov %ebp, %edx
        jmp pass

bad_params:                             /* every vCPU gets here; vCPU 0 reports */
        cmpl $0, 4(%esp)
        jne halt_forever
        mov $msg_bad_params, %esi
        call serial_puts
        mov $EXIT_BAD_PARAMS, %al
        jmp debug_exit

        .section .rodata
        .globl guest_name
guest_name:     .asciz "ab"
msg_bad_params: .asciz "ab: bad start/size\r\n"
key_passes:     .asciz "passes="
