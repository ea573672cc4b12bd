/*
 * disk-rw.s - boot sector: ATA PIO on the primary channel.
 * Reads sector 1 and prints its first 16 bytes as text (up to the first NUL; other
 * bytes outside 0x20-0x7e print as '.'), writes sector 2 with the bytes 0..255 twice,
 * issues FLUSH CACHE, prints "disk ok" and exits with 0x22 (pyvm status 0x45).
 * A drive error or a timeout prints "disk error" and exits with 0x23 (status 0x47).
 *
 * ATA/ATAPI-6 command block registers: 0x1f0 data, 0x1f2 sector count, 0x1f3-0x1f5
 * LBA 7:0, 15:8, 23:16, 0x1f6 device (0xe0 | LBA 27:24: LBA mode, device 0),
 * 0x1f7 status/command (BSY 0x80, DRQ 0x08, ERR 0x01); 0x3f6 device control (nIEN 0x02).
 */
        .include "boot16.inc"

        .set ATA_DATA, 0x1f0
        .set ATA_COUNT, 0x1f2
        .set ATA_LBA0, 0x1f3
        .set ATA_DEVICE, 0x1f6
        .set ATA_STATUS, 0x1f7
        .set ATA_COMMAND, 0x1f7
        .set ATA_CONTROL, 0x3f6
        .set ATA_BSY, 0x80
        .set ATA_DRQ, 0x08
        .set ATA_ERR, 0x01
        .set CMD_READ_SECTORS, 0x20
        .set CMD_WRITE_SECTORS, 0x30
        .set CMD_FLUSH_CACHE, 0xe7
        .set BUFFER, 0x8000
        .set SHOWN_BYTES, 16

        .code16
        .text
        .globl _start
_start:
        BOOT16_START
        mov $ATA_CONTROL, %dx           /* no drive interrupts: we poll */
        mov $0x02, %al
        out %al, %dx

        mov $1, %bx                     /* READ SECTORS, LBA 1 */
        mov $CMD_READ_SECTORS, %ah
        call ata_command
        call ata_wait_drq
        jc disk_error
        mov $ATA_DATA, %dx
        mov $BUFFER, %di
        mov $256, %cx
        rep insw

        mov $BUFFER, %si                /* show the first bytes as text */
        mov $SHOWN_BYTES, %cx
1:      lodsb
        test %al, %al
        jz 3f
        cmp $0x20, %al
        jb 2f
        cmp $0x7e, %al
        jbe 4f
2:      mov $'.', %al
4:      call putc16
        loop 1b
3:      mov $msg_crlf, %si
        call puts16

        mov $BUFFER, %di                /* the pattern 0, 1, ..., 255, 0, 1, ..., 255 */
        xor %ax, %ax
        mov $512, %cx
5:      stosb
        inc %al
        loop 5b

        mov $2, %bx                     /* WRITE SECTORS, LBA 2 */
        mov $CMD_WRITE_SECTORS, %ah
        call ata_command
        call ata_wait_drq
        jc disk_error
        mov $ATA_DATA, %dx
        mov $BUFFER, %si
        mov $256, %cx
        rep outsw
        call ata_wait_idle
        jc disk_error

        xor %bx, %bx                    /* FLUSH CACHE */
        mov $CMD_FLUSH_CACHE, %ah
        call ata_command
        call ata_wait_idle
        jc disk_error

        mov $msg_ok, %si
        call puts16
        mov $0x22, %al
        jmp exit

disk_error:
        mov $msg_error, %si
        call puts16
        mov $0x23, %al
exit:
        out %al, $0xf4
        cli
6:      hlt
        jmp 6b

/* ata_command: AH = command, BX = LBA (< 65536), one sector, device 0, LBA mode. */
ata_command:
        push %ax
        call ata_wait_idle
        pop %ax
        mov $ATA_DEVICE, %dx
        mov $0xe0, %al
        out %al, %dx
        mov $ATA_COUNT, %dx
        mov $1, %al
        out %al, %dx
        inc %dx                         /* LBA 7:0 */
        mov %bl, %al
        out %al, %dx
        inc %dx                         /* LBA 15:8 */
        mov %bh, %al
        out %al, %dx
        inc %dx                         /* LBA 23:16 */
        xor %al, %al
        out %al, %dx
        mov $ATA_COMMAND, %dx
        mov %ah, %al
        out %al, %dx
        mov $ATA_CONTROL, %dx           /* ~400 ns for the status to become valid */
        in %dx, %al
        in %dx, %al
        in %dx, %al
        in %dx, %al
        ret

/* ata_wait_idle: wait for BSY clear; CF = 1 on ERR or timeout. */
ata_wait_idle:
        xor %ah, %ah
        jmp ata_wait
/* ata_wait_drq: wait for BSY clear and DRQ set; CF = 1 on ERR or timeout. */
ata_wait_drq:
        mov $ATA_DRQ, %ah
ata_wait:
        push %ecx
        push %dx
        mov $ATA_STATUS, %dx
        mov $0x100000, %ecx
1:      in %dx, %al
        test $ATA_BSY, %al
        jnz 2f
        test $ATA_ERR, %al
        jnz 3f
        and %ah, %al
        cmp %ah, %al
        je 4f                           /* CF = 0 after an equal compare */
2:      dec %ecx
        jnz 1b
3:      stc
4:      pop %dx
        pop %ecx
        ret

        .include "serial16.inc"

msg_crlf:       .asciz "\r\n"
msg_ok:         .asciz "disk ok\r\n"
msg_error:      .asciz "disk error\r\n"
