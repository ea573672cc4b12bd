/*
 * hello.s - pyvm's default guest (ELF32, loaded and run at 1 MiB).
 *
 * Prints "pyvm hello: guest running", programs the PIC (vectors 0x20-0x2f) and the
 * PIT, enables the UART receive interrupt and idles in HLT.  Every second (every
 * `hz` timer ticks) it prints "tick N"; every received byte is echoed (CR as CR LF).
 * -append: hz=N timer rate, default 100, clamped to 19..10000.
 * Only vCPU 0 works; other vCPUs halt.
 */
        .include "entry32.inc"

        .set VEC_BASE, 0x20             /* PIC master vectors 0x20-0x27, slave 0x28-0x2f */
        .set IRQ_TIMER, 0
        .set IRQ_COM1, 4
        .set HZ_DEFAULT, 100
        .set HZ_MIN, 19                 /* the PIT's 16-bit divisor cannot go slower */
        .set HZ_MAX, 10000

        .code32
        .text
        .globl _start
_start:
        cli
        cld
        ENTRY32_NORMALIZE
        test %ebx, %ebx
        jnz halt_forever
        mov %esi, %ebp                  /* the command line */
        call gdt_load
        call idt_init
        call serial_init
        mov $msg_banner, %esi
        call serial_puts

        mov $HZ_DEFAULT, %eax
        mov %ebp, %esi
        mov $key_hz, %edi
        call cmdline_get
        cmp $HZ_MIN, %eax
        jae 1f
        mov $HZ_MIN, %eax
1:      cmp $HZ_MAX, %eax
        jbe 2f
        mov $HZ_MAX, %eax
2:      mov %eax, hz

        mov $VEC_BASE, %al
        call pic_init
        mov hz, %eax
        call pit_init
        mov $(VEC_BASE + IRQ_TIMER), %eax
        mov $timer_isr, %edx
        call idt_set_gate
        mov $(VEC_BASE + IRQ_COM1), %eax
        mov $com1_isr, %edx
        call idt_set_gate
        call serial_enable_rx_irq
        mov $IRQ_TIMER, %cl
        call pic_unmask
        mov $IRQ_COM1, %cl
        call pic_unmask
        sti
idle:
        hlt
        jmp idle

/* IRQ 0: count ticks; a full second prints "tick N".  Also polls the UART, so a
 * receive interrupt lost between draining and EOI only delays the echo by a tick. */
timer_isr:
        pushal
        cld
        incl ticks_this_second
        mov ticks_this_second, %eax
        cmp hz, %eax
        jb 1f
        movl $0, ticks_this_second
        incl seconds
        mov $msg_tick, %esi
        call serial_puts
        mov seconds, %eax
        call serial_put_dec
        call serial_newline
1:      call echo_received
        call pic_eoi
        popal
        iret

/* IRQ 4: the UART has received data. */
com1_isr:
        pushal
        cld
        call echo_received
        call pic_eoi
        popal
        iret

/* echo_received: echo every byte waiting in the UART; CR is echoed as CR LF. */
echo_received:
        push %eax
1:      call serial_getc
        jc 2f
        call serial_putc
        cmp $'\r', %al
        jne 1b
        mov $'\n', %al
        call serial_putc
        jmp 1b
2:      pop %eax
        ret

        .section .rodata
        .globl guest_name
guest_name:     .asciz "hello"
msg_banner:     .asciz "pyvm hello: guest running\r\n"
msg_tick:       .asciz "tick "
key_hz:         .asciz "hz="

        .bss
        .balign 4
hz:                     .skip 4
ticks_this_second:      .skip 4
seconds:                .skip 4
