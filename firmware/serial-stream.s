/*
 * serial-stream.s - a guest that writes a known byte sequence to COM1 without pause
 * (ELF32; loaded at 1 MiB, runs from 0x10000, see reloc32.s).  Only vCPU 0 works;
 * other vCPUs halt.
 *
 * It prints the lines "1", "2", "3", ... (decimal, CR LF), each byte as soon as LSR
 * says the transmitter holding register is empty.  It waits for THRE without a bound
 * (serial_putc gives up after a while), so a host end that stops reading holds the
 * guest back instead of losing bytes.  Live-migration tests check that the source's
 * and the destination's output together are exactly this sequence.
 * -append: lines=N (print "serial-stream done" and exit with 0x00, pyvm status 1,
 * after line N; default 0 = forever).
 */
        .set COM1_THR, 0x3f8
        .set COM1_LSR, 0x3fd
        .set LSR_THRE, 0x20
        .set EXIT_DONE, 0x00

        .code32
        .text
        .globl main
main:                                   /* EBX = index, ECX = count, ESI = command line */
        test %ebx, %ebx
        jnz halt_forever
        xor %eax, %eax
        mov $key_lines, %edi
        call cmdline_get
        mov %eax, %ebp                  /* EBP = lines to print, 0 = forever */
        xor %ebx, %ebx                  /* EBX = the last line printed */
next_line:
        inc %ebx
        mov %ebx, %eax
        call put_dec
        mov $'\r', %al
        call putc
        mov $'\n', %al
        call putc
        test %ebp, %ebp
        jz next_line
        cmp %ebx, %ebp
        jne next_line
        mov $msg_done, %esi
1:      movb (%esi), %al
        inc %esi
        test %al, %al
        jz 2f
        call putc
        jmp 1b
2:      mov $EXIT_DONE, %al
        jmp debug_exit

/* put_dec: send EAX as an unsigned decimal number.  Changes EAX, ECX, EDX, EDI. */
put_dec:
        mov $10, %ecx
        xor %edi, %edi                  /* digits pushed */
1:      xor %edx, %edx
        div %ecx
        push %edx
        inc %edi
        test %eax, %eax
        jnz 1b
2:      pop %eax
        add $'0', %al
        call putc
        dec %edi
        jnz 2b
        ret

/* putc: send AL once THR is empty, however long that takes.  Changes EDX. */
putc:
        push %eax
        mov $COM1_LSR, %dx
1:      in %dx, %al
        test $LSR_THRE, %al
        jnz 2f
        pause
        jmp 1b
2:      pop %eax
        mov $COM1_THR, %dx
        out %al, %dx
        ret

        .section .rodata
        .globl guest_name
guest_name:     .asciz "serial-stream"
key_lines:      .asciz "lines="
msg_done:       .asciz "serial-stream done\r\n"
