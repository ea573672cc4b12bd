"""An ATA hard disk on the primary channel, PIO only (ports 0x1f0-0x1f7 and 0x3f6, IRQ 14).

Reference: ATA/ATAPI-6 (T13/1410D), section 6 (register set), 8 (commands) and 9 (PIO
data-in / data-out / non-data protocols).  The disk is the master (device 0); with device 1
selected, status reads 0 and commands are ignored, as on a channel with one drive.

Supported: LBA28 and CHS addressing; IDENTIFY DEVICE, READ SECTORS (0x20/0x21), WRITE SECTORS
(0x30/0x31), READ/WRITE MULTIPLE with SET MULTIPLE MODE, READ VERIFY, SEEK, RECALIBRATE,
INITIALIZE DEVICE PARAMETERS, FLUSH CACHE, SET FEATURES (accepted), the power-management
no-ops, EXECUTE DEVICE DIAGNOSTIC and software reset (SRST in the device control register).
Anything else ends with ERR and ABRT.  Commands complete instantly: BSY is only seen while
SRST is held.  The data register takes 8-, 16- and 32-bit accesses (1, 2 or 4 bytes of the
transfer).  INTRQ reaches IRQ 14 while nIEN is clear; reading the status register (not the
alternate status) or writing a command clears it.

The PIO transfer in flight (command, buffer, position, sectors left) is part of the saved
state, so a migration between two data-register reads resumes the transfer.
"""

from __future__ import annotations

from pyvm import __version__
from pyvm.block import SECTOR_SIZE, DiskImage
from pyvm.devices.base import Device
from pyvm.errors import DeviceError
from pyvm.vmstate import Field, VMStateDescription

CMD_BASE = 0x1F0
CTRL_PORT = 0x3F6
ATA_IRQ = 14
MAX_MULTIPLE = 16                   # sectors per DRQ block for READ/WRITE MULTIPLE
LBA28_LIMIT = 1 << 28

# status register (ATA-6 7.15.6)
BSY, DRDY, DF, DSC, DRQ, ERR = 0x80, 0x40, 0x20, 0x10, 0x08, 0x01
# error register
ABRT, IDNF, UNC = 0x04, 0x10, 0x40
# device control register
NIEN, SRST = 0x02, 0x04
# device/head register
DEV_LBA, DEV_SLAVE, DEV_OBSOLETE = 0x40, 0x10, 0xA0

XFER_NONE, XFER_IN, XFER_OUT = 0, 1, 2

CMD_READ = (0x20, 0x21)
CMD_WRITE = (0x30, 0x31)
CMD_READ_MULTIPLE, CMD_WRITE_MULTIPLE, CMD_SET_MULTIPLE = 0xC4, 0xC5, 0xC6
CMD_IDENTIFY, CMD_FLUSH, CMD_SET_FEATURES = 0xEC, 0xE7, 0xEF
CMD_DIAGNOSTIC, CMD_INIT_PARAMS = 0x90, 0x91
CMD_VERIFY = (0x40, 0x41)
CMD_SEEK = 0x70
CMD_CHECK_POWER = 0xE5
CMD_POWER_NOOPS = (0xE0, 0xE1, 0xE2, 0xE3, 0xE6)    # standby/idle immediate, sleep: accepted

ATA_VMSD = VMStateDescription(
    name="ide_drive",
    version_id=1,
    minimum_version_id=1,
    fields=(
        Field("feature", "uint8"),
        Field("error", "uint8"),
        Field("nsector", "uint8"),
        Field("sector", "uint8"),
        Field("lcyl", "uint8"),
        Field("hcyl", "uint8"),
        Field("select", "uint8"),
        Field("status", "uint8"),
        Field("ctrl", "uint8"),
        Field("irq_pending", "uint8"),
        Field("cmd", "uint8"),
        Field("xfer", "uint8"),             # XFER_NONE / XFER_IN / XFER_OUT
        Field("lba", "uint32"),             # first sector of the buffer (writes) / next (reads)
        Field("remaining", "uint32"),       # sectors of the command not yet transferred
        Field("block_sectors", "uint8"),    # sectors in the current DRQ block
        Field("data_pos", "uint32"),
        Field("data_end", "uint32"),
        Field("mult_sectors", "uint8"),
        Field("heads", "uint8"),
        Field("spt", "uint8"),
        Field("io_buffer", "buffer", size=MAX_MULTIPLE * SECTOR_SIZE),
    ),
)


def _ata_string(text: str, length: int) -> list[int]:
    """An IDENTIFY string: space padded, two characters per word, first in the high byte."""
    raw = text.encode("ascii").ljust(length, b" ")[:length]
    return [(raw[i] << 8) | raw[i + 1] for i in range(0, length, 2)]


class AtaDisk(Device):
    """The master disk of the primary ATA channel, backed by a :class:`DiskImage`."""

    idstr = "ide-disk"
    vmsd = ATA_VMSD

    feature: int
    error: int
    nsector: int
    sector: int
    lcyl: int
    hcyl: int
    select: int
    status: int
    ctrl: int
    irq_pending: int
    cmd: int
    xfer: int
    lba: int
    remaining: int
    block_sectors: int
    data_pos: int
    data_end: int
    mult_sectors: int
    heads: int
    spt: int
    io_buffer: bytes

    def __init__(self, image: DiskImage, serial: str = "PV00001") -> None:
        super().__init__()
        self.image = image
        self.serial = serial
        total = min(image.sectors, LBA28_LIMIT - 1)
        # default translation for a disk without a partition table: 16 heads, 63 sectors
        self.default_heads, self.default_spt = 16, 63
        self.cylinders = max(1, min(total // (16 * 63), 16383))
        self._buf = bytearray(MAX_MULTIPLE * SECTOR_SIZE)
        self._irq_level = False
        self._logged: set[int] = set()
        self.reset()

    # -- Device API -------------------------------------------------------------------
    def ports(self) -> list[tuple[int, int]]:
        return [(CMD_BASE, 8), (CTRL_PORT, 1)]

    def reset(self) -> None:
        super().reset()
        self.heads, self.spt = self.default_heads, self.default_spt
        self.ctrl = 0
        self._set_signature()
        self._drive_irq()

    def pre_save(self) -> None:
        self.io_buffer = bytes(self._buf)

    def post_load(self) -> None:
        self._buf[:] = self.io_buffer
        self._irq_level = self._line_level()    # the PIC's saved state holds the line

    def close(self) -> None:
        self.image.close()

    def io_read(self, port: int, size: int) -> int:
        if port == CMD_BASE:
            return self._data_read(size)
        value = 0
        for i in range(size):
            value |= self._read_register(port + i) << (8 * i)
        return value

    def io_write(self, port: int, size: int, value: int) -> None:
        if port == CMD_BASE:
            self._data_write(size, value)
            return
        for i in range(size):
            self._write_register(port + i, (value >> (8 * i)) & 0xFF)

    # -- interrupt ----------------------------------------------------------------------
    def _line_level(self) -> bool:
        return bool(self.irq_pending) and not self.ctrl & NIEN

    def _drive_irq(self) -> None:
        level = self._line_level()
        if level != self._irq_level:
            self._irq_level = level
            if self.ctx is not None:
                self.ctx.set_irq(ATA_IRQ, level)

    def _raise_irq(self) -> None:
        self.irq_pending = 1
        self._drive_irq()

    def _clear_irq(self) -> None:
        self.irq_pending = 0
        self._drive_irq()

    # -- registers ----------------------------------------------------------------------
    def _slave_selected(self) -> bool:
        return bool(self.select & DEV_SLAVE)

    def _read_register(self, port: int) -> int:
        if port == CTRL_PORT:
            return 0 if self._slave_selected() else self.status     # alternate status
        offset = port - CMD_BASE
        if offset == 1:
            return self.error
        if offset == 2:
            return self.nsector
        if offset == 3:
            return self.sector
        if offset == 4:
            return self.lcyl
        if offset == 5:
            return self.hcyl
        if offset == 6:
            return self.select
        if offset == 7:
            if self._slave_selected():
                return 0
            self._clear_irq()
            return self.status
        return 0xFF

    def _write_register(self, port: int, value: int) -> None:
        if port == CTRL_PORT:
            self._write_device_control(value)
            return
        offset = port - CMD_BASE
        if offset == 1:
            self.feature = value
        elif offset == 2:
            self.nsector = value
        elif offset == 3:
            self.sector = value
        elif offset == 4:
            self.lcyl = value
        elif offset == 5:
            self.hcyl = value
        elif offset == 6:
            self.select = value | DEV_OBSOLETE
        elif offset == 7:
            self._command(value)

    def _write_device_control(self, value: int) -> None:
        old = self.ctrl
        self.ctrl = value & (NIEN | SRST)
        if value & SRST and not old & SRST:
            self.status = BSY               # reset asserted: busy until SRST is cleared
            self.xfer = XFER_NONE
            self.irq_pending = 0
        elif old & SRST and not value & SRST:
            self._set_signature()
        self._drive_irq()

    def _set_signature(self) -> None:
        """Register contents after reset or diagnostics: the ATA device signature."""
        self.nsector, self.sector, self.lcyl, self.hcyl = 1, 1, 0, 0
        self.select = DEV_OBSOLETE
        self.error = 0x01                   # diagnostic code: device 0 passed, no device 1
        self.status = DRDY | DSC
        self.xfer = XFER_NONE

    # -- addressing ---------------------------------------------------------------------
    def _get_address(self) -> int | None:
        """The start sector from the registers, or None for an impossible CHS address."""
        if self.select & DEV_LBA:
            return (((self.select & 0x0F) << 24) | (self.hcyl << 16) | (self.lcyl << 8)
                    | self.sector)
        cylinder = (self.hcyl << 8) | self.lcyl
        head = self.select & 0x0F
        if not 1 <= self.sector <= self.spt or head >= self.heads:
            return None
        return (cylinder * self.heads + head) * self.spt + self.sector - 1

    def _set_address(self, lba: int) -> None:
        if self.select & DEV_LBA:
            self.sector = lba & 0xFF
            self.lcyl = (lba >> 8) & 0xFF
            self.hcyl = (lba >> 16) & 0xFF
            self.select = (self.select & 0xF0) | ((lba >> 24) & 0x0F)
        else:
            per_cylinder = self.heads * self.spt
            cylinder, rest = divmod(lba, per_cylinder)
            head, sector = divmod(rest, self.spt)
            self.sector = sector + 1
            self.lcyl = cylinder & 0xFF
            self.hcyl = (cylinder >> 8) & 0xFF
            self.select = (self.select & 0xF0) | (head & 0x0F)

    # -- commands -----------------------------------------------------------------------
    def _finish(self, error: int = 0) -> None:
        """End a command: status, error register, interrupt."""
        self.xfer = XFER_NONE
        self.error = error
        self.status = DRDY | DSC | (ERR if error else 0)
        self._raise_irq()

    def _abort(self) -> None:
        self._finish(ABRT)

    def _command(self, cmd: int) -> None:
        if self.status & BSY:
            return
        if self._slave_selected() and cmd != CMD_DIAGNOSTIC:
            return                          # no device 1 on this channel
        self._clear_irq()
        self.cmd = cmd
        if cmd in CMD_READ or cmd == CMD_READ_MULTIPLE:
            self._start_read(cmd)
        elif cmd in CMD_WRITE or cmd == CMD_WRITE_MULTIPLE:
            self._start_write(cmd)
        elif cmd == CMD_IDENTIFY:
            self._buf[:SECTOR_SIZE] = self._identify()
            self.block_sectors, self.remaining = 1, 1
            self._start_pio(XFER_IN, 1)
            self._raise_irq()
        elif cmd == CMD_FLUSH:
            try:
                self.image.flush()
            except DeviceError as err:
                self._log_error(err)
                self._abort()
                return
            self._finish()
        elif cmd == CMD_SET_MULTIPLE:
            n = self.nsector
            if n == 0 or (n <= MAX_MULTIPLE and n & (n - 1) == 0):
                self.mult_sectors = n
                self._finish()
            else:
                self._abort()
        elif cmd == CMD_INIT_PARAMS:
            if self.nsector == 0:
                self._abort()
            else:
                self.heads, self.spt = (self.select & 0x0F) + 1, self.nsector
                self._finish()
        elif cmd in CMD_VERIFY:
            count = self.nsector or 256
            lba = self._get_address()
            if lba is None or lba + count > self.image.sectors:
                self._finish(IDNF)
            else:
                self._set_address(lba + count - 1)
                self._finish()
        elif cmd == CMD_DIAGNOSTIC:
            self._set_signature()
            self._raise_irq()
        elif cmd == CMD_CHECK_POWER:
            self.nsector = 0xFF             # active or idle
            self._finish()
        elif cmd in (CMD_SET_FEATURES, CMD_SEEK) or 0x10 <= cmd <= 0x1F \
                or cmd in CMD_POWER_NOOPS:
            self._finish()                  # accepted: nothing to do for a virtual disk
        else:
            if cmd not in self._logged and self.ctx is not None:
                self._logged.add(cmd)
                self.ctx.log("unimp", f"ata: command 0x{cmd:02x} aborted")
            self._abort()

    def _block_size(self, cmd: int) -> int:
        return self.mult_sectors if cmd in (CMD_READ_MULTIPLE, CMD_WRITE_MULTIPLE) else 1

    def _check_request(self, cmd: int) -> tuple[int, int] | None:
        """(start, count) of a read/write command, or None after failing it."""
        if cmd in (CMD_READ_MULTIPLE, CMD_WRITE_MULTIPLE) and not self.mult_sectors:
            self._abort()
            return None
        count = self.nsector or 256
        lba = self._get_address()
        if lba is None or lba + count > self.image.sectors:
            self._finish(IDNF)
            return None
        return lba, count

    def _start_pio(self, kind: int, sectors: int) -> None:
        self.xfer = kind
        self.block_sectors = sectors
        self.data_pos = 0
        self.data_end = sectors * SECTOR_SIZE
        self.error = 0
        self.status = DRDY | DSC | DRQ

    def _start_read(self, cmd: int) -> None:
        request = self._check_request(cmd)
        if request is not None:
            self.lba, self.remaining = request
            self._read_block()

    def _read_block(self) -> None:
        """Load the next DRQ block of a read and interrupt (PIO data-in protocol)."""
        n = min(self._block_size(self.cmd), self.remaining)
        try:
            data = self.image.read(self.lba, n)
        except DeviceError as err:
            self._log_error(err)
            self._set_address(self.lba)
            self._finish(UNC)
            return
        self._buf[:len(data)] = data
        self.lba += n
        self._set_address(self.lba)
        self.nsector = (self.remaining - n) & 0xFF
        self._start_pio(XFER_IN, n)
        self._raise_irq()

    def _start_write(self, cmd: int) -> None:
        request = self._check_request(cmd)
        if request is None:
            return
        if self.image.readonly:
            self._abort()
            return
        self.lba, self.remaining = request
        # PIO data-out: DRQ for the first block without an interrupt
        self._start_pio(XFER_OUT, min(self._block_size(cmd), self.remaining))

    def _write_block(self) -> None:
        n = self.block_sectors
        try:
            self.image.write(self.lba, bytes(self._buf[:n * SECTOR_SIZE]))
        except DeviceError as err:
            self._log_error(err)
            self._finish(ABRT)
            return
        self.lba += n
        self.remaining -= n
        self._set_address(self.lba)
        self.nsector = self.remaining & 0xFF
        if self.remaining:
            self._start_pio(XFER_OUT, min(self._block_size(self.cmd), self.remaining))
            self._raise_irq()
        else:
            self._finish()

    # -- data register --------------------------------------------------------------------
    def _data_read(self, size: int) -> int:
        if self.xfer != XFER_IN or self._slave_selected():
            return (1 << (8 * size)) - 1
        pos = self.data_pos
        end = min(pos + size, self.data_end)
        value = int.from_bytes(self._buf[pos:end], "little")
        self.data_pos = end
        if end >= self.data_end:
            self.remaining -= self.block_sectors
            if self.remaining > 0 and self.cmd != CMD_IDENTIFY:
                self._read_block()
            else:
                self.xfer = XFER_NONE
                self.status = DRDY | DSC
        return value

    def _data_write(self, size: int, value: int) -> None:
        if self.xfer != XFER_OUT or self._slave_selected():
            return
        pos = self.data_pos
        end = min(pos + size, self.data_end)
        data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        self._buf[pos:end] = data[:end - pos]
        self.data_pos = end
        if end >= self.data_end:
            self._write_block()

    # -- IDENTIFY DEVICE ------------------------------------------------------------------
    def _identify(self) -> bytes:
        """The 256-word IDENTIFY DEVICE block (ATA-6 8.15, table 27)."""
        total = min(self.image.sectors, LBA28_LIMIT - 1)
        chs_total = min(self.cylinders * self.heads * self.spt, total)
        words = [0] * 256
        words[0] = 0x0040                               # fixed, non-removable ATA device
        words[1] = self.cylinders
        words[3] = self.default_heads
        words[6] = self.default_spt
        words[10:20] = _ata_string(self.serial, 20)
        words[23:27] = _ata_string(__version__, 8)
        words[27:47] = _ata_string("PYVM HARDDISK", 40)
        words[47] = 0x8000 | MAX_MULTIPLE               # READ/WRITE MULTIPLE block limit
        words[49] = 0x0200                              # LBA supported, no DMA
        words[50] = 0x4000
        words[51] = 0x0200                              # PIO mode 2 timing
        words[53] = 0x0003                              # words 54-58 and 64-70 are valid
        words[54] = self.cylinders
        words[55] = self.heads
        words[56] = self.spt
        words[57] = chs_total & 0xFFFF
        words[58] = chs_total >> 16
        words[59] = (0x0100 | self.mult_sectors) if self.mult_sectors else 0
        words[60] = total & 0xFFFF
        words[61] = total >> 16
        words[64] = 0x0003                              # PIO modes 3 and 4
        words[65:69] = [120, 120, 120, 120]             # cycle times, ns
        words[80] = 0x007E                              # ATA-1 .. ATA-6
        words[82] = 0x4020                              # NOP and write cache supported
        words[83] = 0x5000                              # FLUSH CACHE supported
        words[84] = 0x4000
        words[85] = 0x4020
        words[86] = 0x1000
        words[87] = 0x4000
        block = bytearray(b"".join(w.to_bytes(2, "little") for w in words))
        block[510] = 0xA5                               # integrity word signature
        block[511] = (-sum(block[:511])) & 0xFF         # checksum: all 512 bytes sum to 0
        return bytes(block)

    def _log_error(self, err: DeviceError) -> None:
        if self.ctx is not None:
            self.ctx.log("guest_errors", f"ata: {err}")
