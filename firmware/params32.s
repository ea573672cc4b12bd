/*
 * params32.s - the RAM range parameters shared by ab, memcheck and store-loop.
 *
 * range_from_cmdline: reads "start=N size=N" (MiB) from the command line at ESI,
 * with defaults EAX = start and EDX = size in MiB.  The range must begin at 1 MiB or
 * above (the guest's code, stacks and tables live below) and end at or below 4 GiB.
 *   out: CF = 0, EAX = first byte, EDX = byte past the end (0 = 4 GiB) on success;
 *        CF = 1 if the range is invalid (the guest prints an error and exits 0x7d).
 * Changes EAX, EDX and the flags.
 */
        .code32
        .text
        .globl range_from_cmdline
range_from_cmdline:
        push %ebx
        push %edi
        mov $key_start, %edi
        call cmdline_get
        mov %eax, %ebx                  /* start, MiB */
        mov %edx, %eax
        mov $key_size, %edi
        call cmdline_get                /* EAX = size, MiB */
        cmp $1, %ebx
        jb .Lbad
        test %eax, %eax
        jz .Lbad
        mov %ebx, %edx
        add %eax, %edx                  /* end, MiB */
        jc .Lbad
        cmp $4096, %edx
        ja .Lbad
        shl $20, %edx                   /* 4096 MiB becomes 0: "up to 4 GiB" */
        mov %ebx, %eax
        shl $20, %eax
        pop %edi
        pop %ebx
        clc
        ret
.Lbad:
        pop %edi
        pop %ebx
        stc
        ret

        .section .rodata
        .globl key_start, key_size
key_start:      .asciz "start="
key_size:       .asciz "size="
