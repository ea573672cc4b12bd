/*
 * timer-pm.s - timer interrupt test in 32-bit protected mode (ELF32 at 1 MiB).
 *
 * Loads its own GDT and IDT, maps the PIC to vectors 0x20-0x2f, runs the PIT at
 * 1000 Hz and waits in STI; HLT.  After 50 ticks it prints "timer pm ok" and exits
 * with 0x10 (pyvm status 0x21).  Only vCPU 0 runs the test; other vCPUs halt.
 */
        .include "entry32.inc"

        .set VEC_BASE, 0x20
        .set TICK_HZ, 1000
        .set TICKS_WANTED, 50
        .set EXIT_OK, 0x10

        .code32
        .text
        .globl _start
_start:
        cli
        cld
        ENTRY32_NORMALIZE
        test %ebx, %ebx
        jnz halt_forever
        call gdt_load
        call idt_init
        call serial_init
        mov $VEC_BASE, %al
        call pic_init
        mov $TICK_HZ, %eax
        call pit_init
        mov $VEC_BASE, %eax
        mov $timer_isr, %edx
        call idt_set_gate
        xor %cl, %cl
        call pic_unmask
        sti
1:      hlt
        cmpl $TICKS_WANTED, ticks
        jb 1b
        cli
        mov $msg_ok, %esi
        call serial_puts
        mov $EXIT_OK, %al
        jmp debug_exit

timer_isr:
        incl ticks
        call pic_eoi
        iret

        .section .rodata
        .globl guest_name
guest_name:     .asciz "timer-pm"
msg_ok:         .asciz "timer pm ok\r\n"

        .bss
        .balign 4
ticks:          .skip 4
