/*
 * boot-pm.s - boot sector: real mode to 32-bit protected mode.
 * Prints "real" in real mode, enables A20 through port 0x92, loads a GDT, switches to
 * protected mode, prints "prot" and exits with 0x21 (pyvm status 0x43).
 */
        .include "boot16.inc"

        .code16
        .text
        .globl _start
_start:
        BOOT16_START
        mov $msg_real, %si
        call puts16
        ENTER_PM32 protected

        .code32
protected:
        mov $0x10, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov $0x7c00, %esp
        mov $msg_prot, %esi
1:      lodsb                           /* COM1 output, polled: LSR bit 5 = THR empty */
        test %al, %al
        jz 3f
        mov %al, %ah
        mov $0x3fd, %dx
2:      in %dx, %al
        test $0x20, %al
        jz 2b
        mov %ah, %al
        mov $0x3f8, %dx
        out %al, %dx
        jmp 1b
3:      mov $0x21, %al
        out %al, $0xf4
        cli
4:      hlt
        jmp 4b

        .include "serial16.inc"

        BOOT16_GDT
msg_real:       .asciz "real\r\n"
msg_prot:       .asciz "prot\r\n"
