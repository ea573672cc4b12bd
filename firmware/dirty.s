/*
 * dirty.s - a workload with a known, tunable dirtying pattern, for the migration lab
 * (ELF32; loaded at 1 MiB, runs from 0x10000, see reloc32.s).  Only vCPU 0 works;
 * other vCPUs halt.
 *
 * Forever: pick a page of the range by the pattern and increment its first word (one
 * store, so one page dirtied per write).
 *
 * -append "start=N size=N pattern=N rate=N hot=N hotpct=N busy=N quiet=N seed=N"
 *   start, size  the range in MiB (default 1 and 8)
 *   pattern      0 uniform: any page of the range, uniformly at random (default)
 *                1 hot/cold: hotpct% of the writes go to the first hot% of the range,
 *                  the rest uniformly to the other pages (both chosen at random)
 *                2 sweep: page after page in ascending order, wrapping around
 *                3 phases: as uniform for `busy` ticks, then no writes for `quiet` ticks
 *                4 idle: no writes (the timer runs, the CPU waits in HLT)
 *   rate         page writes per 100 Hz timer tick (default 100, i.e. 10000 pages/s;
 *                0 = as fast as possible; at most 4 ticks of unused writes pile up)
 *   hot, hotpct  pattern 1: percent of the range that is hot (default 10), percent of
 *                the writes that go there (default 90)
 *   busy, quiet  pattern 3: ticks of each phase (default 100 and 100: 1 s each)
 *   seed         the xorshift32 generator's seed (default 1; 0 counts as 1)
 *
 * Prints "dirty pattern=P start=S size=Z rate=R" once.  A bad range or pattern prints
 * "dirty: bad parameters" and exits with 0x7d.
 */
        .set START_DEFAULT, 1
        .set SIZE_DEFAULT, 8
        .set RATE_DEFAULT, 100
        .set RATE_HZ, 100
        .set RATE_MAX, 0x100000         /* keeps RATE_BURST * rate inside 32 bits */
        .set RATE_BURST, 4
        .set PATTERNS, 5
        .set P_HOTCOLD, 1
        .set P_SWEEP, 2
        .set P_PHASES, 3
        .set P_IDLE, 4
        .set VEC_BASE, 0x20
        .set EXIT_BAD_PARAMS, 0x7d

        .code32
        .text
        .globl main
main:                                   /* EBX = index, ECX = count, ESI = command line */
        test %ebx, %ebx
        jnz halt_forever
        xor %eax, %eax
        mov $key_pattern, %edi
        call cmdline_get
        cmp $PATTERNS, %eax
        jae bad_params
        mov %eax, pattern
        mov $RATE_DEFAULT, %eax
        mov $key_rate, %edi
        call cmdline_get
        cmp $RATE_MAX, %eax
        jbe 1f
        mov $RATE_MAX, %eax
1:      mov %eax, rate
        imul $RATE_BURST, %eax
        mov %eax, credit_cap
        mov $10, %eax
        mov $key_hot, %edi
        call cmdline_get
        cmp $100, %eax
        ja bad_params
        mov %eax, hot
        mov $90, %eax
        mov $key_hotpct, %edi
        call cmdline_get
        cmp $100, %eax
        ja bad_params
        mov %eax, hotpct
        mov $100, %eax
        mov $key_busy, %edi
        call cmdline_get
        mov %eax, busy
        mov $100, %eax
        mov $key_quiet, %edi
        call cmdline_get
        mov %eax, quiet
        mov $1, %eax
        mov $key_seed, %edi
        call cmdline_get
        test %eax, %eax
        jnz 2f
        inc %eax                        /* xorshift's state must not be 0 */
2:      mov %eax, rng
        mov $START_DEFAULT, %eax
        mov $SIZE_DEFAULT, %edx
        call range_from_cmdline
        jc bad_params
        mov %eax, range_start
        sub %eax, %edx
        shr $12, %edx
        mov %edx, range_pages
        mov %edx, %eax                  /* hot pages = pages * hot / 100, at least 1 */
        mull hot
        mov $100, %ecx
        div %ecx
        test %eax, %eax
        jnz 3f
        inc %eax
3:      mov %eax, hot_pages
        mov range_pages, %edx
        sub %eax, %edx                  /* cold pages; none when hot=100 */
        mov %edx, cold_pages
        cmpl $P_PHASES, pattern         /* busy/quiet only shape pattern 3 */
        je 4f
        movl $1, busy
        movl $0, quiet
4:      mov busy, %eax
        add quiet, %eax
        jz bad_params                   /* a period of 0 ticks */
        mov %eax, period

        mov $msg_start, %esi            /* "dirty pattern=P start=S size=Z rate=R" */
        call serial_puts
        mov pattern, %eax
        call serial_put_dec
        mov $msg_range_start, %esi
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
        call serial_newline

        mov $VEC_BASE, %al              /* the timer drives rates, phases and idling */
        call pic_init
        mov $RATE_HZ, %eax
        call pit_init
        mov $VEC_BASE, %eax
        mov $timer_isr, %edx
        call idt_set_gate
        xor %cl, %cl
        call pic_unmask
        sti
        cmpl $P_IDLE, pattern
        jne write_loop
5:      hlt
        jmp 5b

write_loop:
        call wait_for_credit
        call next_page
        incl (%edi)
        jmp write_loop

bad_params:
        mov $msg_bad_params, %esi
        call serial_puts
        mov $EXIT_BAD_PARAMS, %al
        jmp debug_exit

/* next_page: EDI = the address of the next page to write.  Changes EAX, ECX, EDX. */
next_page:
        mov pattern, %eax
        cmp $P_SWEEP, %eax
        je 3f
        cmp $P_HOTCOLD, %eax
        je 1f
        mov range_pages, %ecx           /* uniform (and phases): 0 .. pages-1 */
        xor %edi, %edi
        jmp 2f
1:      call random                     /* hot/cold: percentile < hotpct -> hot */
        mov $100, %ecx
        mul %ecx
        cmp hotpct, %edx
        mov hot_pages, %ecx
        mov $0, %edi
        jb 2f
        cmpl $0, cold_pages
        je 2f
        mov cold_pages, %ecx
        mov hot_pages, %edi
2:      call random                     /* EDI += random * ECX >> 32 */
        mul %ecx
        add %edx, %edi
        jmp 4f
3:      mov sweep_next, %edi            /* sweep */
        lea 1(%edi), %eax
        cmp range_pages, %eax
        jb 5f
        xor %eax, %eax
5:      mov %eax, sweep_next
4:      shl $12, %edi
        add range_start, %edi
        ret

/* random: EAX = the next xorshift32 value (Marsaglia, "Xorshift RNGs", 2003: 13, 17, 5).
 * Changes EDX. */
random:
        mov rng, %eax
        mov %eax, %edx
        shl $13, %edx
        xor %edx, %eax
        mov %eax, %edx
        shr $17, %edx
        xor %edx, %eax
        mov %eax, %edx
        shl $5, %edx
        xor %edx, %eax
        mov %eax, rng
        ret

/* wait_for_credit: return when a write is allowed: during a busy phase, and with
 * rate=N once a tick has granted one (taken here).  Sleeps in STI; HLT, which has no
 * window for a lost wakeup (STI takes effect after the next instruction). */
wait_for_credit:
        cli
1:      cmpl $0, busy_now
        je 3f
        cmpl $0, rate
        je 2f
        cmpl $0, credits
        jne 4f
3:      sti
        hlt
        cli
        jmp 1b
4:      decl credits
2:      sti
        ret

/* IRQ 0 at 100 Hz: the phase of tick (ticks mod period) is busy below `busy`; a busy
 * tick grants `rate` writes, keeping at most RATE_BURST ticks' worth. */
timer_isr:
        push %eax
        push %edx
        mov ticks, %eax
        inc %eax
        mov %eax, ticks
        xor %edx, %edx
        divl period
        xor %eax, %eax
        cmp busy, %edx
        jae 1f
        inc %eax
1:      mov %eax, busy_now
        test %eax, %eax
        jz 2f
        mov credits, %eax
        add rate, %eax
        cmp credit_cap, %eax
        jbe 3f
        mov credit_cap, %eax
3:      mov %eax, credits
2:      call pic_eoi
        pop %edx
        pop %eax
        iret

        .section .rodata
        .globl guest_name
guest_name:     .asciz "dirty"
key_pattern:    .asciz "pattern="
key_rate:       .asciz "rate="
key_hot:        .asciz "hot="
key_hotpct:     .asciz "hotpct="
key_busy:       .asciz "busy="
key_quiet:      .asciz "quiet="
key_seed:       .asciz "seed="
msg_start:      .asciz "dirty pattern="
msg_range_start: .asciz " start="
msg_size:       .asciz " size="
msg_rate:       .asciz " rate="
msg_bad_params: .asciz "dirty: bad parameters\r\n"

        .bss
        .balign 4
pattern:        .skip 4
rate:           .skip 4
credit_cap:     .skip 4
credits:        .skip 4
hot:            .skip 4
hotpct:         .skip 4
hot_pages:      .skip 4
cold_pages:     .skip 4
busy:           .skip 4
quiet:          .skip 4
period:         .skip 4
busy_now:       .skip 4
ticks:          .skip 4
rng:            .skip 4
range_start:    .skip 4
range_pages:    .skip 4
sweep_next:     .skip 4
