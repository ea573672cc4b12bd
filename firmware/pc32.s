/*
 * pc32.s - 32-bit protected-mode platform pieces shared by the pyvm ELF32 guests:
 * our own GDT, an IDT with reporting exception handlers, the 8259A PIC pair, the
 * 8254 PIT, the isa-debug-exit port and halting.
 *
 * Each guest defines `guest_name` (a NUL-terminated string) for exception reports.
 * Every routine preserves all registers it is not documented to change.
 */
        .code32

        .set SEL_CODE, 0x08
        .set SEL_DATA, 0x10

        .set PIC1_CMD,  0x20            /* Intel 8259A: master at 0x20/0x21 */
        .set PIC1_DATA, 0x21
        .set PIC2_CMD,  0xa0            /* slave at 0xa0/0xa1, cascaded on master IRQ 2 */
        .set PIC2_DATA, 0xa1
        .set PIC_EOI,   0x20            /* OCW2: non-specific end of interrupt */

        .set PIT_CH0,   0x40            /* Intel 8254: counter 0 drives IRQ 0 */
        .set PIT_CTRL,  0x43
        .set PIT_HZ,    1193182         /* input clock */

        .set DEBUG_EXIT_PORT, 0xf4      /* isa-debug-exit: status = (value << 1) | 1 */
        .set EXIT_EXCEPTION, 0x7e

        .set IDT_VECTORS, 48            /* 0-31 exceptions, 32-47 the two PICs */

        .data
        .balign 8
/* Flat 4 GiB segments.  Accessed bits are preset so the CPU never writes the table. */
gdt:
        .quad 0
        .quad 0x00cf9b000000ffff        /* 0x08: code, base 0, limit 4 GiB, 32-bit */
        .quad 0x00cf93000000ffff        /* 0x10: data, base 0, limit 4 GiB */
gdt_end:
        .balign 4
        .word 0
gdt_desc:
        .word gdt_end - gdt - 1
        .long gdt
        .word 0
idt_desc:
        .word IDT_VECTORS * 8 - 1
        .long idt

        .bss
        .balign 8
idt:
        .skip IDT_VECTORS * 8

        .text
/* gdt_load: switch to our own GDT and reload every segment register. */
        .globl gdt_load
gdt_load:
        push %eax
        lgdt gdt_desc
        ljmp $SEL_CODE, $1f
1:      mov $SEL_DATA, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %fs
        mov %ax, %gs
        mov %ax, %ss
        pop %eax
        ret

/*
 * idt_init: vectors 0-31 report the exception on COM1 and exit; 32-47 acknowledge
 * the PIC and return (a guest replaces the ones it uses with idt_set_gate).
 */
        .globl idt_init
idt_init:
        pushal
        xor %eax, %eax
1:      mov exception_stubs(,%eax,4), %edx
        call idt_set_gate
        inc %eax
        cmp $32, %eax
        jb 1b
2:      mov $irq_ignore_master, %edx
        cmp $40, %eax
        jb 3f
        mov $irq_ignore_slave, %edx
3:      call idt_set_gate
        inc %eax
        cmp $IDT_VECTORS, %eax
        jb 2b
        popal
        /* fall through */

/* idt_load: load the shared IDT (for a vCPU other than the one that filled it). */
        .globl idt_load
idt_load:
        lidt idt_desc
        ret

/* idt_set_gate: EAX = vector (< 48), EDX = handler; a ring-0 32-bit interrupt gate. */
        .globl idt_set_gate
idt_set_gate:
        push %edi
        push %edx
        lea idt(,%eax,8), %edi
        mov %dx, (%edi)                 /* offset 15:0 */
        movw $SEL_CODE, 2(%edi)
        movw $0x8e00, 4(%edi)           /* P=1, DPL=0, type 0xe (32-bit interrupt gate) */
        shr $16, %edx
        mov %dx, 6(%edi)                /* offset 31:16 */
        pop %edx
        pop %edi
        ret

irq_ignore_slave:
        push %eax
        mov $PIC_EOI, %al
        out %al, $PIC2_CMD
        jmp 1f
irq_ignore_master:
        push %eax
1:      mov $PIC_EOI, %al
        out %al, $PIC1_CMD
        pop %eax
        iret

/*
 * pic_init: AL = vector base of the master (the slave gets AL + 8).  Runs the 8259A
 * ICW1-ICW4 sequence on both chips, then masks every IRQ except the cascade (IRQ 2).
 */
        .globl pic_init
pic_init:
        push %eax
        push %ecx
        mov %al, %cl
        mov $0x11, %al                  /* ICW1: edge triggered, cascade, ICW4 follows */
        out %al, $PIC1_CMD
        out %al, $PIC2_CMD
        mov %cl, %al                    /* ICW2: vector base */
        out %al, $PIC1_DATA
        add $8, %al
        out %al, $PIC2_DATA
        mov $0x04, %al                  /* ICW3 master: a slave on IRQ 2 */
        out %al, $PIC1_DATA
        mov $0x02, %al                  /* ICW3 slave: cascade identity 2 */
        out %al, $PIC2_DATA
        mov $0x01, %al                  /* ICW4: 8086 mode, normal EOI */
        out %al, $PIC1_DATA
        out %al, $PIC2_DATA
        mov $0xfb, %al                  /* OCW1: mask all but the cascade */
        out %al, $PIC1_DATA
        mov $0xff, %al
        out %al, $PIC2_DATA
        pop %ecx
        pop %eax
        ret

/* pic_unmask: CL = IRQ number 0-15; clears its bit in the owning PIC's mask (OCW1). */
        .globl pic_unmask
pic_unmask:
        push %eax
        push %ecx
        push %edx
        mov $PIC1_DATA, %dx
        cmp $8, %cl
        jb 1f
        mov $PIC2_DATA, %dx
        sub $8, %cl
1:      mov $1, %ch
        shl %cl, %ch
        not %ch
        in %dx, %al
        and %ch, %al
        out %al, %dx
        pop %edx
        pop %ecx
        pop %eax
        ret

/* pic_eoi: non-specific EOI to the master (for IRQs 0-7). */
        .globl pic_eoi
pic_eoi:
        push %eax
        mov $PIC_EOI, %al
        out %al, $PIC1_CMD
        pop %eax
        ret

/*
 * pit_init: EAX = frequency in Hz.  Counter 0, mode 2 (rate generator), divisor
 * round(1193182 / Hz) clamped to 1..65535, so the slowest rate is about 18.2 Hz.
 */
        .globl pit_init
pit_init:
        pushal
        mov %eax, %ecx
        test %ecx, %ecx
        jnz 1f
        inc %ecx
1:      mov %ecx, %eax
        shr $1, %eax
        add $PIT_HZ, %eax
        xor %edx, %edx
        div %ecx
        test %eax, %eax
        jnz 2f
        inc %eax
2:      cmp $0xffff, %eax
        jbe 3f
        mov $0xffff, %eax
3:      mov %eax, %ecx
        mov $0x34, %al                  /* counter 0, lobyte then hibyte, mode 2, binary */
        out %al, $PIT_CTRL
        mov %cl, %al
        out %al, $PIT_CH0
        mov %ch, %al
        out %al, $PIT_CH0
        popal
        ret

/* debug_exit: write AL to isa-debug-exit; if pyvm has none, halt forever. */
        .globl debug_exit
debug_exit:
        out %al, $DEBUG_EXIT_PORT
        /* fall through */

/* halt_forever: interrupts off, HLT in a loop.  Never returns. */
        .globl halt_forever
halt_forever:
        cli
1:      hlt
        jmp 1b

/*
 * Exception stubs: push a zero where the CPU pushes no error code (Intel SDM vol. 3,
 * table 6-1: vectors 8, 10-14, 17, 21, 29 and 30 have one), then the vector number.
 */
        .macro EXCEPTION_STUB vec
exception_\vec:
        .if (\vec == 8) || ((\vec >= 10) && (\vec <= 14)) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
        .else
        push $0
        .endif
        push $\vec
        jmp exception_report
        .endm

        .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        EXCEPTION_STUB \v
        .endr

/* Stack: vector, error code, EIP.  Prints "<guest>: exception V err E eip X" and exits. */
exception_report:
        cli
        mov $guest_name, %esi
        call serial_puts
        mov $msg_exception, %esi
        call serial_puts
        mov (%esp), %eax
        call serial_put_dec
        mov $msg_err, %esi
        call serial_puts
        mov 4(%esp), %eax
        call serial_put_hex
        mov $msg_eip, %esi
        call serial_puts
        mov 8(%esp), %eax
        call serial_put_hex
        call serial_newline
        mov $EXIT_EXCEPTION, %al
        jmp debug_exit

        .section .rodata
        .balign 4
exception_stubs:
        .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .long exception_\v
        .endr
msg_exception:  .asciz ": exception "
msg_err:        .asciz " err "
msg_eip:        .asciz " eip "
