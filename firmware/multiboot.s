/*
 * multiboot.s - a Multiboot (version 1) header, so the ELF32 guests also boot under
 * other PC virtual machines' -kernel (which load an ELF with such a header by its
 * program headers).  pyvm itself ignores it.  Multiboot Specification 0.6.96, 3.1.1:
 * magic 0x1BADB002, flags, checksum with magic + flags + checksum = 0 (mod 2^32),
 * 4-byte aligned within the first 8192 bytes of the file.
 */
        .section .multiboot, "a"
        .balign 4
        .set MB_MAGIC, 0x1badb002
        .set MB_FLAGS, 0                /* no requests; bit 16 clear: use the ELF headers */
        .long MB_MAGIC
        .long MB_FLAGS
        .long -(MB_MAGIC + MB_FLAGS)
