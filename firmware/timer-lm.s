/*
 * timer-lm.s - timer interrupt test in 64-bit long mode (ELF64 at 1 MiB).
 *
 * pyvm enters in long mode with paging on (identity-mapped 2 MiB pages, tables at
 * 0x1000-0x6fff).  The guest loads its own GDT (0x08 64-bit code, 0x10 data) and a
 * 64-bit IDT, maps the PIC to vectors 0x20-0x2f, runs the PIT at 1000 Hz and waits in
 * STI; HLT.  After 50 ticks it prints "timer lm ok" and exits with 0x10 (pyvm status
 * 0x21).  Any CPU exception prints "timer-lm: exception V rip X" and exits with 0x7e.
 * Only vCPU 0 runs the test; other vCPUs halt.
 */
        .set COM1, 0x3f8
        .set UART_LSR, COM1 + 5
        .set LSR_THRE, 0x20
        .set PIC1_CMD, 0x20
        .set PIC1_DATA, 0x21
        .set PIC2_CMD, 0xa0
        .set PIC2_DATA, 0xa1
        .set PIT_CH0, 0x40
        .set PIT_CTRL, 0x43
        .set PIT_DIVISOR, 1193          /* 1193182 Hz / 1193 = 1000.15 Hz */
        .set VEC_BASE, 0x20
        .set IDT_VECTORS, 48
        .set TICKS_WANTED, 50
        .set EXIT_OK, 0x10
        .set EXIT_EXCEPTION, 0x7e

        .code64
        .text
        .globl _start
_start:
        cli
        cld
        test %ebx, %ebx
        jnz halt_forever
        lgdt gdt_desc(%rip)
        pushq $0x08                     /* reload CS through a far return */
        lea 1f(%rip), %rax
        push %rax
        lretq
1:      mov $0x10, %eax
        mov %eax, %ds
        mov %eax, %es
        mov %eax, %ss

        /* IDT: 0-31 exception stubs, 32-47 acknowledge and return, 0x20 the timer. */
        xor %ecx, %ecx
2:      lea exception_stubs(%rip), %rax
        mov (%rax,%rcx,8), %rax
        call set_gate
        inc %ecx
        cmp $32, %ecx
        jb 2b
3:      lea irq_ignore(%rip), %rax
        call set_gate
        inc %ecx
        cmp $IDT_VECTORS, %ecx
        jb 3b
        mov $VEC_BASE, %ecx
        lea timer_isr(%rip), %rax
        call set_gate
        lidt idt_desc(%rip)

        call serial_init
        /* 8259A: ICW1 edge/cascade/ICW4, ICW2 vector bases, ICW3 wiring, ICW4 8086. */
        mov $0x11, %al
        out %al, $PIC1_CMD
        out %al, $PIC2_CMD
        mov $VEC_BASE, %al
        out %al, $PIC1_DATA
        mov $(VEC_BASE + 8), %al
        out %al, $PIC2_DATA
        mov $0x04, %al
        out %al, $PIC1_DATA
        mov $0x02, %al
        out %al, $PIC2_DATA
        mov $0x01, %al
        out %al, $PIC1_DATA
        out %al, $PIC2_DATA
        mov $0xfe, %al                  /* OCW1: only IRQ 0 */
        out %al, $PIC1_DATA
        mov $0xff, %al
        out %al, $PIC2_DATA
        /* 8254: counter 0, lobyte/hibyte, mode 2 (rate generator). */
        mov $0x34, %al
        out %al, $PIT_CTRL
        mov $(PIT_DIVISOR & 0xff), %al
        out %al, $PIT_CH0
        mov $(PIT_DIVISOR >> 8), %al
        out %al, $PIT_CH0

        sti
4:      hlt
        cmpl $TICKS_WANTED, ticks(%rip)
        jb 4b
        cli
        lea msg_ok(%rip), %rsi
        call puts
        mov $EXIT_OK, %al
debug_exit:
        out %al, $0xf4
halt_forever:
        cli
5:      hlt
        jmp 5b

/* set_gate: ECX = vector, RAX = handler: a 16-byte 64-bit interrupt gate (Intel SDM
 * vol. 3, 6.14.1): offset 15:0, selector, IST 0, type 0x8e, offset 31:16, 63:32. */
set_gate:
        push %rdi
        lea idt(%rip), %rdi
        mov %ecx, %edx
        shl $4, %edx
        add %rdx, %rdi
        mov %ax, (%rdi)
        movw $0x08, 2(%rdi)
        movw $0x8e00, 4(%rdi)
        shr $16, %rax
        mov %ax, 6(%rdi)
        shr $16, %rax
        mov %eax, 8(%rdi)
        movl $0, 12(%rdi)
        pop %rdi
        ret

timer_isr:
        push %rax
        incl ticks(%rip)
        mov $0x20, %al                  /* non-specific EOI */
        out %al, $PIC1_CMD
        pop %rax
        iretq

irq_ignore:
        push %rax
        mov $0x20, %al
        out %al, $PIC2_CMD
        out %al, $PIC1_CMD
        pop %rax
        iretq

/* Exception stubs push the vector; vectors with a CPU error code (8, 10-14, 17, 21,
 * 29, 30) leave it under the vector, so RIP is one slot further up for them. */
        .macro EXCEPTION_STUB vec
exception_\vec:
        .if (\vec == 8) || ((\vec >= 10) && (\vec <= 14)) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
        .else
        pushq $0
        .endif
        pushq $\vec
        jmp exception_report
        .endm

        .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        EXCEPTION_STUB \v
        .endr

exception_report:                       /* stack: vector, error code, RIP */
        lea msg_exception(%rip), %rsi
        call puts
        mov (%rsp), %rax
        call put_dec
        lea msg_rip(%rip), %rsi
        call puts
        mov 16(%rsp), %rax
        call put_hex
        lea msg_crlf(%rip), %rsi
        call puts
        mov $EXIT_EXCEPTION, %al
        jmp debug_exit

/* serial_init: 115200 8N1, FIFOs on, UART interrupts off (PC16550D registers). */
serial_init:
        mov $(COM1 + 1), %dx
        xor %al, %al
        out %al, %dx
        mov $(COM1 + 3), %dx
        mov $0x80, %al
        out %al, %dx
        mov $COM1, %dx
        mov $1, %al
        out %al, %dx
        mov $(COM1 + 1), %dx
        xor %al, %al
        out %al, %dx
        mov $(COM1 + 3), %dx
        mov $0x03, %al
        out %al, %dx
        mov $(COM1 + 2), %dx
        mov $0x07, %al
        out %al, %dx
        mov $(COM1 + 4), %dx
        mov $0x0b, %al
        out %al, %dx
        ret

/* putc: AL to COM1 after a bounded wait for THR empty.  Changes ECX, EDX. */
putc:
        push %rax
        mov $UART_LSR, %dx
        mov $100000, %ecx
1:      in %dx, %al
        test $LSR_THRE, %al
        jnz 2f
        pause
        loop 1b
2:      pop %rax
        mov $COM1, %dx
        out %al, %dx
        ret

/* puts: the NUL-terminated string at RSI.  Changes RAX, RCX, RDX, RSI. */
puts:
        lodsb
        test %al, %al
        jz 1f
        call putc
        jmp puts
1:      ret

/* put_dec: RAX (< 2^32) in decimal.  Changes RAX, RBX, RCX, RDX. */
put_dec:
        mov $10, %ebx
        xor %ecx, %ecx
1:      xor %edx, %edx
        div %rbx
        push %rdx
        inc %ecx
        test %rax, %rax
        jnz 1b
2:      pop %rax
        add $'0', %al
        push %rcx
        call putc
        pop %rcx
        dec %ecx
        jnz 2b
        ret

/* put_hex: RAX as 0x and 16 hex digits.  Changes RAX, RBX, RCX, RDX. */
put_hex:
        mov %rax, %rbx
        mov $'0', %al
        call putc
        mov $'x', %al
        call putc
        mov $16, %ecx
1:      rol $4, %rbx
        mov %bl, %al
        and $0x0f, %al
        cmp $10, %al
        jb 2f
        add $('a' - '0' - 10), %al
2:      add $'0', %al
        push %rcx
        call putc
        pop %rcx
        dec %ecx
        jnz 1b
        ret

        .section .rodata
        .balign 8
exception_stubs:
        .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .quad exception_\v
        .endr
msg_ok:         .asciz "timer lm ok\r\n"
msg_exception:  .asciz "timer-lm: exception "
msg_rip:        .asciz " rip "
msg_crlf:       .asciz "\r\n"

        .data
        .balign 8
gdt:
        .quad 0
        .quad 0x00209b0000000000        /* 0x08: 64-bit code (L=1), present, accessed */
        .quad 0x00cf93000000ffff        /* 0x10: data */
gdt_end:
        .balign 8
        .word 0, 0, 0
gdt_desc:
        .word gdt_end - gdt - 1
        .quad gdt
        .balign 8
        .word 0, 0, 0
idt_desc:
        .word IDT_VECTORS * 16 - 1
        .quad idt

        .bss
        .balign 16
idt:
        .skip IDT_VECTORS * 16
ticks:
        .skip 4
