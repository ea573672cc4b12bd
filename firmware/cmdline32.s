/*
 * cmdline32.s - "key=value" lookup in the -append command line.
 *
 * The command line is a NUL-terminated string of words separated by spaces.  A value
 * is an unsigned number, decimal or 0x-prefixed hexadecimal, ending at a space or the
 * end of the string; anything else makes the word count as absent.
 */
        .code32
        .text

/*
 * cmdline_get: look up a numeric parameter.
 *   in:  ESI = command line (0 = none), EDI = key with its '=' ("hz="), NUL-terminated,
 *        EAX = default value
 *   out: EAX = the value of the first well-formed "key=N" word, else the default;
 *        CF = 0 if found, 1 if the default was kept.
 * Only EAX and the flags change.
 */
        .globl cmdline_get
cmdline_get:
        push %ebx
        push %ecx
        push %edx
        push %esi
        push %eax                       /* the default, restored when not found */
        test %esi, %esi
        jz .Lnot_found
        mov %esi, %ebx                  /* EBX = start of the current word */
.Lskip_spaces:
        movb (%ebx), %al
        cmp $' ', %al
        jne .Lword
        inc %ebx
        jmp .Lskip_spaces
.Lword:
        test %al, %al
        jz .Lnot_found
        mov %ebx, %esi                  /* ESI walks the word, EDX walks the key */
        mov %edi, %edx
.Lcompare:
        movb (%edx), %cl
        test %cl, %cl
        jz .Lkey_matched
        cmpb %cl, (%esi)
        jne .Lnext_word
        inc %esi
        inc %edx
        jmp .Lcompare
.Lkey_matched:
        call parse_number
        jnc .Lfound
.Lnext_word:                            /* move EBX past this word */
        movb (%ebx), %al
        test %al, %al
        jz .Lnot_found
        cmp $' ', %al
        je .Lskip_spaces
        inc %ebx
        jmp .Lnext_word
.Lfound:
        add $4, %esp                    /* drop the saved default */
        pop %esi
        pop %edx
        pop %ecx
        pop %ebx
        clc
        ret
.Lnot_found:
        pop %eax
        pop %esi
        pop %edx
        pop %ecx
        pop %ebx
        stc
        ret

/*
 * parse_number: ESI = text; EAX = its value, CF = 0 when the text is one or more digits
 * (decimal, or hex after "0x") followed by a space or NUL; CF = 1 otherwise.
 * Changes EAX, ECX, EDX, ESI and the flags.  Overflow wraps (mod 2^32).
 */
parse_number:
        push %ebx
        xor %eax, %eax
        xor %ecx, %ecx                  /* digits seen */
        mov $10, %ebx                   /* base */
        cmpb $'0', (%esi)
        jne .Ldigit
        movb 1(%esi), %dl
        or $0x20, %dl                   /* lower case */
        cmp $'x', %dl
        jne .Ldigit
        mov $16, %ebx
        add $2, %esi
.Ldigit:
        movzbl (%esi), %edx
        test %dl, %dl
        jz .Lend
        cmp $' ', %dl
        je .Lend
        sub $'0', %dl
        cmp $9, %dl
        jbe .Lhave_digit
        movzbl (%esi), %edx
        or $0x20, %dl
        sub $('a' - 10), %dl
        cmp $10, %dl
        jb .Lbad                        /* below 'a' */
.Lhave_digit:
        cmp %ebx, %edx
        jae .Lbad                       /* not a digit in this base */
        imul %ebx, %eax
        add %edx, %eax
        inc %ecx
        inc %esi
        jmp .Ldigit
.Lend:
        test %ecx, %ecx
        jz .Lbad
        pop %ebx
        clc
        ret
.Lbad:
        pop %ebx
        stc
        ret
