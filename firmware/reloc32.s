/*
 * reloc32.s - entry for the guests whose workload starts at 1 MiB, where pyvm loads
 * ELF images (ab, memcheck, store-loop).  Such a guest is linked to run at 0x10000
 * (see elf32-low.ld) but loaded at 1 MiB, so its code never lies in its own RAM range:
 *
 *   1. vCPU 0 copies the image down, clears its .bss, copies the command line to
 *      .bss, then publishes RELOC_MAGIC; the other vCPUs wait for it.
 *   2. Every vCPU jumps to the copy and loads the GDT and IDT (vCPU 0 first sets up
 *      COM1 and fills the IDT, see pc32.s).  Each AP marks itself arrived and waits;
 *      vCPU 0 waits for all APs, so none is still executing the load copy, clears
 *      the load copy (the RAM range then starts out as zeros) and releases them.
 *   3. main runs with EBX = vCPU index, ECX = vCPU count, ESI = the command line copy
 *      (an empty string if there was none), the vCPU's own stack, interrupts off.
 *
 * The code before the jump runs at the load address, not the link address: it uses
 * only absolute operands and jumps within itself.
 */
        .include "entry32.inc"

        .set RELOC_MAGIC, 0x434f4c52    /* "RLOC" */
        .set MAX_CPUS, 256              /* size of the arrival table */
        .set CMDLINE_MAX, 1024          /* pyvm's -append limit, NUL included */

        .code32
        .section .text.entry, "ax"
        .globl _start
_start:
        cli
        cld
        ENTRY32_NORMALIZE
        test %ebx, %ebx
        jnz .Lwait_for_copy
        mov %ecx, %edx                  /* keep the vCPU count */
        mov %esi, %ebp                  /* and the command line */
        mov $__image_lma, %esi
        mov $__image_start, %edi
        mov $__image_size, %ecx
        rep movsb
        mov $__bss_start, %edi
        mov $__bss_size, %ecx
        xor %eax, %eax
        rep stosb
        test %ebp, %ebp
        jz .Lcopied
        mov %ebp, %esi
        mov $cmdline_copy, %edi
        mov $(CMDLINE_MAX - 1), %ecx    /* the cleared .bss supplies the NUL */
.Lcopy_cmdline:
        lodsb
        test %al, %al
        jz .Lcopied
        stosb
        loop .Lcopy_cmdline
.Lcopied:
        mov %edx, %ecx
        movl $RELOC_MAGIC, reloc_ready
        jmp .Lrelocated
.Lwait_for_copy:
        pause
        cmpl $RELOC_MAGIC, reloc_ready
        jne .Lwait_for_copy
.Lrelocated:
        mov $reloc_main, %eax
        jmp *%eax

        .text
reloc_main:
        call gdt_load
        test %ecx, %ecx                 /* a count of 0 would be a loader bug: run alone */
        jnz 0f
        inc %ecx
0:      test %ebx, %ebx
        jnz 1f
        call serial_init
        call idt_init                   /* vCPU 0 fills the shared IDT (and loads it) */
        jmp 5f
1:      call idt_load                   /* filled before anyone passes the barrier */
5:      cmp $MAX_CPUS, %ebx
        jae halt_forever
        test %ebx, %ebx
        jz .Lbsp_barrier
        movb $1, cpu_arrived(%ebx)      /* an AP: arrived; wait for vCPU 0's release */
1:      pause
        cmpb $0, cpu_arrived
        je 1b
        jmp .Lrun_main
.Lbsp_barrier:                          /* vCPU 0: wait for cpu_arrived[1 .. count-1] */
        mov %ecx, %edx
        cmp $MAX_CPUS, %edx
        jbe 2f
        mov $MAX_CPUS, %edx
2:      mov $1, %eax
        jmp 4f
3:      cmpb $0, cpu_arrived(%eax)
        jne 6f
        pause
        jmp 3b
6:      inc %eax
4:      cmp %edx, %eax
        jb 3b
        push %ecx                       /* nobody runs the load copy now: clear it, so */
        mov $__image_lma, %edi          /* the RAM range starts out as zeros */
        mov $__image_size, %ecx
        xor %eax, %eax
        rep stosb
        pop %ecx
        movb $1, cpu_arrived            /* release the APs */
.Lrun_main:
        xor %eax, %eax
        mov $cmdline_copy, %esi
        jmp main

        .bss
        .balign 4
reloc_ready:
        .skip 4
cpu_arrived:
        .skip MAX_CPUS
cmdline_copy:
        .skip CMDLINE_MAX
