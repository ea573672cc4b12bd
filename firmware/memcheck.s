/*
 * memcheck.s - RAM integrity workload (ELF32; loaded at 1 MiB, runs from 0x10000,
 * see reloc32.s).  Only vCPU 0 works; other vCPUs halt.
 *
 * Every 32-bit word i of page p (p = physical address / 4096) in generation g holds
 *     seed(p, g) + i * WORD_STEP   (mod 2^32)
 * where seed is a bijective 32-bit mix of p and g (below), so a page holding another
 * generation's or another page's data, or a torn page, fails the check.
 *
 * Generation 0 fills the range.  Then forever: generation += 1; each page is checked
 * against the previous generation and rewritten with the new one, word by word;
 * "memcheck gen N ok" follows each generation.  On a mismatch it prints
 *     memcheck FAIL page P gen G        (P decimal page frame number, G the generation
 *     memcheck word W got X want Y       the page should have held; W word index)
 * and exits with 0x7f (pyvm status 0xff), halting if there is no exit device.
 *
 * -append: start=N size=N (MiB; default 1 and 8), gens=N (stop after generation N
 * with "memcheck done" and exit 0x00, pyvm status 1; default 0 = never),
 * rate=N (at most N pages per 100 Hz timer tick, driven by PIT interrupts and HLT;
 * default 0 = as fast as possible, no interrupts).
 * A bad range prints "memcheck: bad start/size" and exits with 0x7d.
 */
        .set START_DEFAULT, 1
        .set SIZE_DEFAULT, 8
        .set PAGE_WORDS, 1024
        .set WORD_STEP, 0x27d4eb2f      /* odd, so words of a page never repeat */
        .set RATE_HZ, 100
        .set RATE_MAX, 0x100000         /* keeps RATE_BURST * rate inside 32 bits */
        .set RATE_BURST, 4              /* ticks of unused credit that may pile up */
        .set VEC_BASE, 0x20
        .set EXIT_DONE, 0x00
        .set EXIT_BAD_PARAMS, 0x7d
        .set EXIT_FAIL, 0x7f

        .code32
        .text
        .globl main
main:                                   /* EBX = index, ECX = count, ESI = command line */
        test %ebx, %ebx
        jnz halt_forever
        xor %eax, %eax
        mov $key_rate, %edi
        call cmdline_get
        cmp $RATE_MAX, %eax
        jbe 1f
        mov $RATE_MAX, %eax
1:      mov %eax, rate
        xor %eax, %eax
        mov $key_gens, %edi
        call cmdline_get
        mov %eax, gens
        mov $START_DEFAULT, %eax
        mov $SIZE_DEFAULT, %edx
        call range_from_cmdline
        jc bad_params
        mov %eax, range_start
        sub %eax, %edx
        shr $12, %edx
        mov %edx, range_pages

        mov $msg_start, %esi            /* "memcheck start=S size=Z rate=R gens=G" */
        call serial_puts
        mov range_start, %eax
        shr $20, %eax
        call serial_put_dec
        mov $msg_size, %esi
        call serial_puts
        mov range_pages, %eax
        shr $8, %eax
        call serial_put_dec
        mov $msg_rate, %esi
        call serial_puts
        mov rate, %eax
        call serial_put_dec
        mov $msg_gens, %esi
        call serial_puts
        mov gens, %eax
        call serial_put_dec
        call serial_newline

        cmpl $0, rate
        je 2f
        mov rate, %eax
        imul $RATE_BURST, %eax
        mov %eax, credit_cap
        mov $VEC_BASE, %al
        call pic_init
        mov $RATE_HZ, %eax
        call pit_init
        mov $VEC_BASE, %eax
        mov $timer_isr, %edx
        call idt_set_gate
        xor %cl, %cl
        call pic_unmask
        sti

2:      movl $0, generation             /* generation 0: fill */
        mov range_start, %edi
        mov range_pages, %ecx
3:      call wait_for_credit
        call fill_page
        add $4096, %edi
        loop 3b

next_generation:
        incl generation
        mov range_start, %edi
        mov range_pages, %ecx
4:      call wait_for_credit
        call check_and_rewrite_page
        add $4096, %edi
        loop 4b
        mov $msg_gen, %esi
        call serial_puts
        mov generation, %eax
        call serial_put_dec
        mov $msg_ok, %esi
        call serial_puts
        mov gens, %eax
        test %eax, %eax
        jz next_generation
        cmp generation, %eax
        jne next_generation
        cli
        mov $msg_done, %esi
        call serial_puts
        mov $EXIT_DONE, %al
        jmp debug_exit

bad_params:
        mov $msg_bad_params, %esi
        call serial_puts
        mov $EXIT_BAD_PARAMS, %al
        jmp debug_exit

/* page_seed: EAX = page frame number, EDX = generation -> EAX = seed.  Changes EDX.
 * The finalizer is MurmurHash3's fmix32, a bijection on 32-bit values. */
page_seed:
        imul $0x9e3779b1, %eax, %eax
        imul $0x85ebca77, %edx, %edx
        add %edx, %eax
        xor $0x6d656d63, %eax           /* "memc": page 0, generation 0 is not 0 */
        mov %eax, %edx
        shr $16, %edx
        xor %edx, %eax
        imul $0x85ebca6b, %eax, %eax
        mov %eax, %edx
        shr $13, %edx
        xor %edx, %eax
        imul $0xc2b2ae35, %eax, %eax
        mov %eax, %edx
        shr $16, %edx
        xor %edx, %eax
        ret

/* fill_page: write generation `generation`'s pattern to the page at EDI. */
fill_page:
        pushal
        mov %edi, %eax
        shr $12, %eax
        mov generation, %edx
        call page_seed
        mov $PAGE_WORDS, %ecx
1:      mov %eax, (%edi)
        add $WORD_STEP, %eax
        add $4, %edi
        loop 1b
        popal
        ret

/* check_and_rewrite_page: the page at EDI must hold generation - 1's pattern; each
 * word is checked, then overwritten with generation's.  A mismatch never returns. */
check_and_rewrite_page:
        pushal
        mov %edi, %eax
        shr $12, %eax
        mov generation, %edx
        dec %edx
        call page_seed
        mov %eax, %ebx                  /* EBX = expected word */
        mov %edi, %eax
        shr $12, %eax
        mov generation, %edx
        call page_seed
        mov %eax, %edx                  /* EDX = new word */
        mov $PAGE_WORDS, %ecx
1:      cmp %ebx, (%edi)
        jne check_failed
        mov %edx, (%edi)
        add $WORD_STEP, %ebx
        add $WORD_STEP, %edx
        add $4, %edi
        loop 1b
        popal
        ret

check_failed:                           /* EDI = the word's address, EBX = its expected value */
        cli
        mov $msg_fail_page, %esi
        call serial_puts
        mov %edi, %eax
        shr $12, %eax
        call serial_put_dec
        mov $msg_fail_gen, %esi
        call serial_puts
        mov generation, %eax
        dec %eax
        call serial_put_dec
        call serial_newline
        mov $msg_fail_word, %esi
        call serial_puts
        mov %edi, %eax
        and $0xfff, %eax
        shr $2, %eax
        call serial_put_dec
        mov $msg_fail_got, %esi
        call serial_puts
        mov (%edi), %eax
        call serial_put_hex
        mov $msg_fail_want, %esi
        call serial_puts
        mov %ebx, %eax
        call serial_put_hex
        call serial_newline
        mov $EXIT_FAIL, %al
        jmp debug_exit

/* wait_for_credit: with rate=N, take one page of credit, sleeping in HLT until a
 * timer tick grants some.  STI; HLT has no window for a lost wakeup: STI takes effect
 * after the next instruction. */
wait_for_credit:
        cmpl $0, rate
        je 3f
        cli
1:      cmpl $0, credits
        jne 2f
        sti
        hlt
        cli
        jmp 1b
2:      decl credits
        sti
3:      ret

/* IRQ 0 at 100 Hz: grant `rate` pages, keeping at most RATE_BURST ticks' worth. */
timer_isr:
        push %eax
        mov credits, %eax
        add rate, %eax
        cmp credit_cap, %eax
        jbe 1f
        mov credit_cap, %eax
1:      mov %eax, credits
        call pic_eoi
        pop %eax
        iret

        .section .rodata
        .globl guest_name
guest_name:     .asciz "memcheck"
key_rate:       .asciz "rate="
key_gens:       .asciz "gens="
msg_start:      .asciz "memcheck start="
msg_size:       .asciz " size="
msg_rate:       .asciz " rate="
msg_gens:       .asciz " gens="
msg_gen:        .asciz "memcheck gen "
msg_ok:         .asciz " ok\r\n"
msg_done:       .asciz "memcheck done\r\n"
msg_fail_page:  .asciz "memcheck FAIL page "
msg_fail_gen:   .asciz " gen "
msg_fail_word:  .asciz "memcheck word "
msg_fail_got:   .asciz " got "
msg_fail_want:  .asciz " want "
msg_bad_params: .asciz "memcheck: bad start/size\r\n"

        .bss
        .balign 4
range_start:    .skip 4
range_pages:    .skip 4
rate:           .skip 4
gens:           .skip 4
generation:     .skip 4
credits:        .skip 4
credit_cap:     .skip 4
