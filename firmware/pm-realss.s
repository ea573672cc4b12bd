/*
 * pm-realss.s - boot sector: protected mode that keeps real-mode SS and ES.
 * Enters 32-bit protected mode and reloads only DS, as many boot loaders do: SS and ES
 * keep selector 0 and the hidden base/limit real mode gave them (0, 0xffff), which is
 * legal until they are reloaded.  Prints "prot", then counts forever: every 2^21 rounds
 * it prints "pm tick N" (N = 1, 2, ...).  Each round pushes and pops through SS and
 * stores and loads through ES; a mismatch prints "pm-realss: FAIL" and exits with 0x7e.
 */
        .include "boot16.inc"

        .code16
        .text
        .globl _start
_start:
        BOOT16_START
        ENTER_PM32 protected

        .code32
protected:
        mov $0x10, %ax
        mov %ax, %ds                    /* only DS: SS and ES keep their real-mode caches */
        mov $msg_prot, %esi
        call puts32
        xor %ebx, %ebx                  /* ticks printed */
        xor %ecx, %ecx                  /* rounds */
round:
        push %ecx                       /* SS:SP, SS base 0 limit 0xffff */
        mov %ecx, %es:0x7e00            /* ES base 0 limit 0xffff */
        pop %eax
        cmp %eax, %ecx
        jne fail
        mov %es:0x7e00, %eax
        cmp %eax, %ecx
        jne fail
        inc %ecx
        test $0x1fffff, %ecx
        jnz round
        inc %ebx
        mov $msg_tick, %esi
        call puts32
        mov %ebx, %eax
        call putdec32
        mov $msg_crlf, %esi
        call puts32
        jmp round

fail:   mov $msg_fail, %esi
        call puts32
        mov $0x7e, %al
        out %al, $0xf4
        cli
1:      hlt
        jmp 1b

/* putc32: send AL on COM1, polled (LSR bit 5 = THR empty).  Preserves registers. */
putc32: push %edx
        push %eax
        mov $0x3fd, %dx
1:      in %dx, %al
        test $0x20, %al
        jz 1b
        pop %eax
        mov $0x3f8, %dx
        out %al, %dx
        pop %edx
        ret

/* puts32: send the NUL-terminated string at DS:ESI.  Clobbers ESI and AL. */
puts32: lodsb
        test %al, %al
        jz 1f
        call putc32
        jmp puts32
1:      ret

/* putdec32: send EAX in decimal.  Clobbers EAX and EDX. */
putdec32:
        push %ecx
        push %edi
        mov $10, %edi
        xor %ecx, %ecx
1:      xor %edx, %edx
        div %edi
        push %edx
        inc %ecx
        test %eax, %eax
        jnz 1b
2:      pop %eax
        add $'0', %al
        call putc32
        loop 2b
        pop %edi
        pop %ecx
        ret

        .include "serial16.inc"

        BOOT16_GDT
msg_prot:       .asciz "prot\r\n"
msg_tick:       .asciz "pm tick "
msg_crlf:       .asciz "\r\n"
msg_fail:       .asciz "pm-realss: FAIL\r\n"
