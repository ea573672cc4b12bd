/*
 * serial32.s - COM1 console output for the 32-bit pyvm guests.
 *
 * COM1 is a 16550A UART at I/O port 0x3f8.  Register offsets and bits follow the
 * National Semiconductor PC16550D datasheet (section 8, "Registers"):
 *   +0 RBR (read) / THR (write), or DLL when LCR.DLAB = 1
 *   +1 IER, or DLM when LCR.DLAB = 1
 *   +2 IIR (read) / FCR (write)
 *   +3 LCR   +4 MCR   +5 LSR (bit 0 data ready, bit 5 THR empty)
 *
 * Every routine preserves all registers and flags it is not documented to change.
 * Lines end with CR LF, as a serial terminal expects.
 */
        .code32
        .text

        .set COM1,      0x3f8
        .set UART_RBR,  COM1 + 0
        .set UART_THR,  COM1 + 0
        .set UART_IER,  COM1 + 1
        .set UART_FCR,  COM1 + 2
        .set UART_LCR,  COM1 + 3
        .set UART_MCR,  COM1 + 4
        .set UART_LSR,  COM1 + 5

        .set LCR_DLAB,  0x80            /* divisor latch access */
        .set LCR_8N1,   0x03            /* 8 data bits, no parity, 1 stop bit */
        .set FCR_INIT,  0x07            /* FIFO enable, clear RX FIFO, clear TX FIFO */
        .set MCR_INIT,  0x0b            /* DTR | RTS | OUT2 (OUT2 gates the IRQ on a PC) */
        .set LSR_DR,    0x01
        .set LSR_THRE,  0x20
        .set THRE_SPINS, 100000         /* give up waiting for THR empty after this */

/* serial_init: 115200 baud 8N1, FIFOs on, UART interrupts off. */
        .globl serial_init
serial_init:
        push %eax
        push %edx
        mov $UART_IER, %dx
        xor %al, %al
        out %al, %dx
        mov $UART_LCR, %dx
        mov $LCR_DLAB, %al
        out %al, %dx
        mov $UART_THR, %dx              /* DLL: 1.8432 MHz / (16 * 1) = 115200 baud */
        mov $1, %al
        out %al, %dx
        mov $UART_IER, %dx              /* DLM */
        xor %al, %al
        out %al, %dx
        mov $UART_LCR, %dx
        mov $LCR_8N1, %al
        out %al, %dx
        mov $UART_FCR, %dx
        mov $FCR_INIT, %al
        out %al, %dx
        mov $UART_MCR, %dx
        mov $MCR_INIT, %al
        out %al, %dx
        pop %edx
        pop %eax
        ret

/* serial_enable_rx_irq: IER = 1, "received data available" interrupt only. */
        .globl serial_enable_rx_irq
serial_enable_rx_irq:
        push %eax
        push %edx
        mov $UART_IER, %dx
        mov $0x01, %al
        out %al, %dx
        pop %edx
        pop %eax
        ret

/* serial_putc: send AL.  Waits (bounded) for THR empty first. */
        .globl serial_putc
serial_putc:
        push %ecx
        push %edx
        push %eax
        mov $UART_LSR, %dx
        mov $THRE_SPINS, %ecx
1:      in %dx, %al
        test $LSR_THRE, %al
        jnz 2f
        pause
        loop 1b
2:      pop %eax
        mov $UART_THR, %dx
        out %al, %dx
        pop %edx
        pop %ecx
        ret

/* serial_getc: if a byte was received, return it in AL with CF=0; else CF=1. */
        .globl serial_getc
serial_getc:
        push %edx
        push %eax
        mov $UART_LSR, %dx
        in %dx, %al
        test $LSR_DR, %al
        jz 1f
        pop %eax
        mov $UART_RBR, %dx
        in %dx, %al
        pop %edx
        clc
        ret
1:      pop %eax
        pop %edx
        stc
        ret

/* serial_puts: send the NUL-terminated string at ESI. */
        .globl serial_puts
serial_puts:
        push %esi
        push %eax
1:      movb (%esi), %al
        inc %esi
        test %al, %al
        jz 2f
        call serial_putc
        jmp 1b
2:      pop %eax
        pop %esi
        ret

/* serial_newline: send CR LF. */
        .globl serial_newline
serial_newline:
        push %eax
        mov $'\r', %al
        call serial_putc
        mov $'\n', %al
        call serial_putc
        pop %eax
        ret

/* serial_put_dec: send EAX as an unsigned decimal number. */
        .globl serial_put_dec
serial_put_dec:
        pushal
        mov $10, %ecx
        xor %ebx, %ebx                  /* digits pushed */
1:      xor %edx, %edx
        div %ecx
        push %edx
        inc %ebx
        test %eax, %eax
        jnz 1b
2:      pop %eax
        add $'0', %al
        call serial_putc
        dec %ebx
        jnz 2b
        popal
        ret

/* serial_put_hex: send EAX as 0x followed by 8 lowercase hex digits. */
        .globl serial_put_hex
serial_put_hex:
        pushal
        mov %eax, %edx
        mov $'0', %al
        call serial_putc
        mov $'x', %al
        call serial_putc
        mov $8, %ecx
1:      rol $4, %edx
        mov %dl, %al
        and $0x0f, %al
        cmp $10, %al
        jb 2f
        add $('a' - '0' - 10), %al
2:      add $'0', %al
        call serial_putc
        loop 1b
        popal
        ret
