/*
 * store-loop.s - the dirty-tracking benchmark guest (ELF32; loaded at 1 MiB, runs
 * from 0x10000, see reloc32.s).  Only vCPU 0 works; other vCPUs halt.  It never prints.
 *
 * Pass n (n = 1, 2, ...) stores the 32-bit value n to every word of the range, in
 * ascending order; EAX counts the passes.  So every pass dirties every page, and after
 * pass n the whole range holds n.
 * -append: start=N size=N (MiB; default 1 and 8), iters=N (exit with 0x00, pyvm status
 * 1, after N passes; default 0 = forever).  A bad range exits with 0x7d.
 */
        .set START_DEFAULT, 1
        .set SIZE_DEFAULT, 8
        .set EXIT_DONE, 0x00
        .set EXIT_BAD_PARAMS, 0x7d

        .code32
        .text
        .globl main
main:                                   /* EBX = index, ECX = count, ESI = command line */
        test %ebx, %ebx
        jnz halt_forever
        xor %eax, %eax
        mov $key_iters, %edi
        call cmdline_get
        mov %eax, %ebp                  /* EBP = passes to run, 0 = forever */
        mov $START_DEFAULT, %eax
        mov $SIZE_DEFAULT, %edx
        call range_from_cmdline
        jc bad_params
        mov %eax, %ebx                  /* EBX = range start */
        sub %eax, %edx
        shr $2, %edx
        mov %edx, %ecx                  /* ECX = words in the range */
        xor %eax, %eax                  /* EAX = passes done */
next_pass:
        inc %eax
        mov %ebx, %edi
        mov %ecx, %edx
1:      mov %eax, (%edi)
        add $4, %edi
        dec %edx
        jnz 1b
        test %ebp, %ebp
        jz next_pass
        cmp %eax, %ebp
        jne next_pass
        mov $EXIT_DONE, %al
        jmp debug_exit

bad_params:
        mov $EXIT_BAD_PARAMS, %al
        jmp debug_exit

        .section .rodata
        .globl guest_name
guest_name:     .asciz "store-loop"
key_iters:      .asciz "iters="
