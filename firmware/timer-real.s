/*
 * timer-real.s - boot sector: timer interrupts in real mode.
 * Maps the PIC to vectors 0x20-0x2f, points IVT entry 0x20 (IRQ 0) at a handler, runs
 * the PIT at 1000 Hz and waits in STI; HLT.  After 50 ticks prints "timer real ok" and
 * exits with 0x10 (pyvm status 0x21).
 */
        .include "boot16.inc"

        .set VEC_BASE, 0x20
        .set PIT_DIVISOR, 1193          /* 1193182 Hz / 1193 = 1000.15 Hz */
        .set TICKS_WANTED, 50

        .code16
        .text
        .globl _start
_start:
        BOOT16_START
        movw $timer_isr, VEC_BASE * 4   /* IVT entry: offset, then segment */
        movw $0, VEC_BASE * 4 + 2
        mov $0x11, %al                  /* 8259A ICW1: edge, cascade, ICW4 follows */
        out %al, $0x20
        out %al, $0xa0
        mov $VEC_BASE, %al              /* ICW2: vector bases */
        out %al, $0x21
        mov $(VEC_BASE + 8), %al
        out %al, $0xa1
        mov $0x04, %al                  /* ICW3: slave on master IRQ 2 */
        out %al, $0x21
        mov $0x02, %al
        out %al, $0xa1
        mov $0x01, %al                  /* ICW4: 8086 mode */
        out %al, $0x21
        out %al, $0xa1
        mov $0xfe, %al                  /* OCW1: only IRQ 0 */
        out %al, $0x21
        mov $0xff, %al
        out %al, $0xa1
        mov $0x34, %al                  /* 8254: counter 0, lobyte/hibyte, mode 2 */
        out %al, $0x43
        mov $(PIT_DIVISOR & 0xff), %al
        out %al, $0x40
        mov $(PIT_DIVISOR >> 8), %al
        out %al, $0x40
        sti
1:      hlt
        cmpw $TICKS_WANTED, ticks
        jb 1b
        cli
        mov $msg_ok, %si
        call puts16
        mov $0x10, %al
        out %al, $0xf4
2:      hlt
        jmp 2b

timer_isr:
        push %ax
        incw %cs:ticks
        mov $0x20, %al                  /* non-specific EOI */
        out %al, $0x20
        pop %ax
        iret

        .include "serial16.inc"

        .balign 2
ticks:          .word 0
msg_ok:         .asciz "timer real ok\r\n"
