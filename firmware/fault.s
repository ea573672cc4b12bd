/*
 * fault.s - boot sector that faults on purpose, to exercise pyvm's fault report.
 * Prints "fault: jumping to 0xf0000000", switches to 32-bit protected mode and jumps
 * to 0xf0000000, which is beyond guest RAM (an instruction fetch from unmapped
 * memory).  Nothing after the jump runs.
 */
        .include "boot16.inc"

        .set FAULT_TARGET, 0xf0000000

        .code16
        .text
        .globl _start
_start:
        BOOT16_START
        mov $msg_fault, %si
        call puts16
        ENTER_PM32 protected

        .code32
protected:
        mov $0x10, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov $0x7c00, %esp
        mov $FAULT_TARGET, %eax
        jmp *%eax

        .include "serial16.inc"

        BOOT16_GDT
msg_fault:      .asciz "fault: jumping to 0xf0000000\r\n"
