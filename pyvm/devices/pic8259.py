"""The PC's cascaded pair of 8259A programmable interrupt controllers.

The master answers at 0x20/0x21 and the slave at 0xa0/0xa1; the slave's INT output feeds
the master's IR2.  The edge/level control registers (ELCR, one per chip) are at 0x4d0
(master) and 0x4d1 (slave).  References: Intel 8259A datasheet (order no. 231468),
sections "Initialization Command Words" and "Operation Command Words"; the ELCR masks
come from the PIIX/ISA bridge (IRQ 0, 1, 2, 8 and 13 are always edge triggered).

Besides port I/O the pair offers the machine three calls:

* :meth:`PicPair.set_irq` drives ISA line 0-15 (a rising edge latches IRR in edge mode);
* :meth:`PicPair.has_pending` says whether the INT output to the CPU is asserted;
* :meth:`PicPair.acknowledge` runs an INTA cycle and returns the vector.

Whenever the INT output goes from low to high the pair calls ``ctx.kick()`` so that the run
loop stops the vCPU and delivers the interrupt.

The hot paths (``set_irq``, ``has_pending``, ``acknowledge``, port I/O: every timer tick
runs them) have a C twin in :mod:`pyvm._pic` working on the same register lists; the
methods below are the reference, used when ``PYVM_PURE_PYTHON=1`` or
``PYVM_DELIVERY=python`` is set or the extension is not built.

Deviation from the silicon: the master's cascade input (IR2) follows the slave's INT output
as a level, whatever its trigger mode, so a slave request raised while another slave request
is being acknowledged is never lost.
"""

from __future__ import annotations

import os
from typing import Any

from pyvm.devices.base import Device
from pyvm.native_modules import load_native
from pyvm.vmstate import Field, VMStateDescription

MASTER, SLAVE = 0, 1
CASCADE_IRQ = 2
# ELCR bits that can be set (PIIX: IRQ 0, 1, 2 on the master, 8 and 13 on the slave are edge only).
ELCR_MASK = (0xF8, 0xDE)

# ICW1 (written to the command port with bit 4 set)
ICW1_IC4 = 0x01     # ICW4 will follow
ICW1_SNGL = 0x02    # single chip: no ICW3
ICW1_LTIM = 0x08    # level-triggered mode
ICW1_INIT = 0x10
# ICW4
ICW4_AEOI = 0x02
ICW4_SFNM = 0x10
# OCW3 (command port, bits 4-3 = 01)
OCW3_RIS = 0x01     # with RR: read ISR instead of IRR
OCW3_RR = 0x02
OCW3_POLL = 0x04
OCW3_SMM = 0x20
OCW3_ESMM = 0x40

# init_state: which ICW the data port expects next
INIT_NONE, INIT_ICW2, INIT_ICW3, INIT_ICW4 = 0, 1, 2, 3

_PER_CHIP = ("last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select",
             "poll", "special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi",
             "special_fully_nested_mode", "init4", "single_mode", "elcr", "ltim")

PIC_VMSD = VMStateDescription(
    name="i8259-pair",
    version_id=1,
    minimum_version_id=1,
    # every field is a [master, slave] pair
    fields=tuple(Field(name, "uint8", count=2) for name in _PER_CHIP),
)


_native: Any = load_native("pyvm._pic")


def _lowest_priority_index(bits: int, priority_add: int) -> int:
    """Priority rank (0 = highest) of the best request in ``bits``, or 8 if none.

    IR(priority_add) has the highest priority and the order rotates from there
    (8259A datasheet, "Rotation (Specific and Automatic)").
    """
    if bits == 0:
        return 8
    for rank in range(8):
        if bits & (1 << ((rank + priority_add) & 7)):
            return rank
    return 8


class PicPair(Device):
    """Master and slave 8259A with the PC wiring (slave on master IR2)."""

    idstr = "i8259-pair"
    vmsd = PIC_VMSD

    last_irr: list[int]
    irr: list[int]
    imr: list[int]
    isr: list[int]
    priority_add: list[int]
    irq_base: list[int]
    read_reg_select: list[int]
    poll: list[int]
    special_mask: list[int]
    init_state: list[int]
    auto_eoi: list[int]
    rotate_on_auto_eoi: list[int]
    special_fully_nested_mode: list[int]
    init4: list[int]
    single_mode: list[int]
    elcr: list[int]
    ltim: list[int]

    def __init__(self, native: bool | None = None) -> None:
        super().__init__()
        if native is None:      # read per device, as PYVM_DELIVERY is per vCPU (tests set it)
            native = os.environ.get("PYVM_DELIVERY", "") != "python"
        #: the C twin (pyvm._pic) runs the hot paths
        self.native = bool(native) and _native is not None
        self._int_out = False
        self._logged: set[str] = set()
        # Rising edges per ISA line for ``info irq`` (hw/intc/i8259.c pic_stat_update_irq);
        # statistics, not machine state: neither reset nor migrated.
        self.irq_count = [0] * 16
        self._irq_level = [False] * 16
        self.reset()

    # -- Device API -------------------------------------------------------------------
    def ports(self) -> list[tuple[int, int]]:
        return [(0x20, 2), (0xA0, 2), (0x4D0, 2)]

    def reset(self) -> None:
        super().reset()             # every register of both chips (and the ELCRs) to 0
        self._int_out = False

    def post_load(self) -> None:
        self._int_out = self._master_irq() >= 0

    def io_read(self, port: int, size: int) -> int:
        if self.native:
            return int(_native.io_read(self, port, size))
        value = 0
        for i in range(size):
            value |= self._read_byte(port + i) << (8 * i)
        return value

    def io_write(self, port: int, size: int, value: int) -> None:
        if self.native:
            _native.io_write(self, port, size, value)
            return
        for i in range(size):
            self._write_byte(port + i, (value >> (8 * i)) & 0xFF)

    def native_port_io(self) -> tuple[Any, Any] | None:
        """The C port path (``read(pic, port, size)``, ``write(pic, port, size, value)``),
        which :meth:`io_read`/:meth:`io_write` call when native, for the vCPUs' native
        IN/OUT hooks to call directly (pyvm/_portio.pyx); None when not native."""
        return (_native.io_read, _native.io_write) if self.native else None

    # -- machine API --------------------------------------------------------------------
    def set_irq(self, line: int, level: bool) -> None:
        """Drive ISA interrupt ``line`` (0-15) to ``level``."""
        if self.native:
            _native.set_irq(self, line, level)
            return
        if not 0 <= line <= 15:
            raise ValueError(f"ISA IRQ line {line} out of range 0-15")
        if level and not self._irq_level[line]:
            self.irq_count[line] += 1
        self._irq_level[line] = level
        self._set_input(line >> 3, line & 7, level)
        self._update()

    def print_info(self) -> str:
        """``info pic``: one line per chip (hw/intc/i8259_common.c pic_print_info)."""
        return "".join(
            "pic%d: irr=%02x imr=%02x isr=%02x hprio=%d irq_base=%02x rr_sel=%d elcr=%02x "
            "fnm=%d\n" % (chip, self.irr[chip], self.imr[chip], self.isr[chip],
                          self.priority_add[chip], self.irq_base[chip],
                          self.read_reg_select[chip], self.elcr[chip],
                          self.special_fully_nested_mode[chip])
            for chip in (MASTER, SLAVE))

    def has_pending(self) -> bool:
        """True when an unmasked request beats everything in service (the INT output)."""
        if self.native:
            return bool(_native.has_pending(self))
        return self._master_irq() >= 0

    def acknowledge(self) -> int:
        """The INTA cycle: move the winning request to ISR and return its vector.

        With nothing pending (the request went away) the master answers with its IR7
        vector and the slave with its IR7 vector, without touching ISR — a spurious
        interrupt, as the datasheet describes.
        """
        if self.native:
            return int(_native.acknowledge(self))
        irq = self._master_irq()
        if irq < 0:
            vector = (self.irq_base[MASTER] + 7) & 0xFF
        elif irq == CASCADE_IRQ and not self.single_mode[MASTER]:
            slave_irq = self._chip_irq(SLAVE)
            if slave_irq >= 0:
                self._intack(SLAVE, slave_irq)
                vector = (self.irq_base[SLAVE] + slave_irq) & 0xFF
            else:
                vector = (self.irq_base[SLAVE] + 7) & 0xFF
            self._intack(MASTER, irq)
        else:
            self._intack(MASTER, irq)
            vector = (self.irq_base[MASTER] + irq) & 0xFF
        self._update()
        return vector

    # -- internals ----------------------------------------------------------------------
    def _is_level(self, chip: int, mask: int) -> bool:
        return bool(self.ltim[chip]) or bool(self.elcr[chip] & mask)

    def _set_input(self, chip: int, n: int, level: bool) -> None:
        mask = 1 << n
        if self._is_level(chip, mask):
            if level:
                self.irr[chip] |= mask
            else:
                self.irr[chip] &= ~mask & 0xFF
        elif level and not self.last_irr[chip] & mask:
            self.irr[chip] |= mask          # rising edge latches IRR until INTA
        if level:
            self.last_irr[chip] |= mask
        else:
            self.last_irr[chip] &= ~mask & 0xFF

    def _chip_irq(self, chip: int) -> int:
        """The IR line this chip would present to the CPU, or -1."""
        pending = self.irr[chip] & ~self.imr[chip] & 0xFF
        rank = _lowest_priority_index(pending, self.priority_add[chip])
        if rank == 8:
            return -1
        in_service = self.isr[chip]
        if self.special_mask[chip]:
            in_service &= ~self.imr[chip]       # special mask mode: masked levels do not block
        if chip == MASTER and self.special_fully_nested_mode[MASTER]:
            in_service &= ~(1 << CASCADE_IRQ)   # SFNM: the slave may nest into its own level
        if rank < _lowest_priority_index(in_service, self.priority_add[chip]):
            return (rank + self.priority_add[chip]) & 7
        return -1

    def _master_irq(self) -> int:
        return self._chip_irq(MASTER)

    def _update(self) -> None:
        """Propagate the slave's INT to master IR2 and report a new INT to the run loop."""
        if not self.single_mode[MASTER]:
            slave_out = self._chip_irq(SLAVE) >= 0
            mask = 1 << CASCADE_IRQ
            if slave_out:
                self.irr[MASTER] |= mask
                self.last_irr[MASTER] |= mask
            else:
                self.irr[MASTER] &= ~mask & 0xFF
                self.last_irr[MASTER] &= ~mask & 0xFF
        out = self._master_irq() >= 0
        if out and not self._int_out and self.ctx is not None:
            self.ctx.kick()
        self._int_out = out

    def _intack(self, chip: int, irq: int) -> None:
        mask = 1 << irq
        if self.auto_eoi[chip]:
            if self.rotate_on_auto_eoi[chip]:
                self.priority_add[chip] = (irq + 1) & 7
        else:
            self.isr[chip] |= mask
        if not (chip == MASTER and irq == CASCADE_IRQ) and not self._is_level(chip, mask):
            self.irr[chip] &= ~mask & 0xFF

    def _init_reset(self, chip: int) -> None:
        """State after ICW1 (datasheet "Initialization Command Word 1")."""
        self.irr[chip] = self.last_irr[chip] & (0xFF if self.ltim[chip] else self.elcr[chip])
        self.imr[chip] = 0
        self.isr[chip] = 0
        self.priority_add[chip] = 0
        self.irq_base[chip] = 0
        self.read_reg_select[chip] = 0
        self.poll[chip] = 0
        self.special_mask[chip] = 0
        self.init_state[chip] = INIT_NONE
        self.auto_eoi[chip] = 0
        self.rotate_on_auto_eoi[chip] = 0
        self.special_fully_nested_mode[chip] = 0
        self.init4[chip] = 0
        self.single_mode[chip] = 0

    def _unimp(self, what: str) -> None:
        if what not in self._logged and self.ctx is not None:
            self._logged.add(what)
            self.ctx.log("unimp", f"i8259: {what}")

    def _read_byte(self, port: int) -> int:
        if port in (0x4D0, 0x4D1):
            return self.elcr[port - 0x4D0]
        if port not in (0x20, 0x21, 0xA0, 0xA1):
            return 0xFF
        chip = MASTER if port < 0xA0 else SLAVE
        if self.poll[chip]:
            self.poll[chip] = 0
            return self._poll_read(chip)
        if port & 1:
            return self.imr[chip]
        return self.isr[chip] if self.read_reg_select[chip] else self.irr[chip]

    def _poll_read(self, chip: int) -> int:
        """OCW3 poll command: the next read returns 0x80|level and acknowledges it."""
        irq = self._chip_irq(chip)
        if irq < 0:
            return 0
        # a master answer of 2 tells the guest to poll the slave next
        self._intack(chip, irq)
        self._update()
        return 0x80 | irq

    def _write_byte(self, port: int, value: int) -> None:
        if port in (0x4D0, 0x4D1):
            chip = port - 0x4D0
            self.elcr[chip] = value & ELCR_MASK[chip]
            self._update()
            return
        if port not in (0x20, 0x21, 0xA0, 0xA1):
            return
        chip = MASTER if port < 0xA0 else SLAVE
        if port & 1:
            self._write_data(chip, value)
        elif value & ICW1_INIT:
            self._write_icw1(chip, value)
        elif value & 0x08:
            self._write_ocw3(chip, value)
        else:
            self._write_ocw2(chip, value)
        self._update()

    def _write_icw1(self, chip: int, value: int) -> None:
        self.ltim[chip] = 1 if value & ICW1_LTIM else 0
        self._init_reset(chip)
        self.single_mode[chip] = 1 if value & ICW1_SNGL else 0
        self.init4[chip] = 1 if value & ICW1_IC4 else 0
        self.init_state[chip] = INIT_ICW2
        if value & 0x04:
            self._unimp("ICW1 call address interval 4 (8080 mode)")

    def _write_data(self, chip: int, value: int) -> None:
        state = self.init_state[chip]
        if state == INIT_NONE:
            self.imr[chip] = value          # OCW1
        elif state == INIT_ICW2:
            self.irq_base[chip] = value & 0xF8   # x86 mode: T7-T3 from ICW2, low bits = IR level
            if not self.single_mode[chip]:
                self.init_state[chip] = INIT_ICW3
            elif self.init4[chip]:
                self.init_state[chip] = INIT_ICW4
            else:
                self.init_state[chip] = INIT_NONE
        elif state == INIT_ICW3:
            # cascade wiring is fixed on a PC (slave on IR2, slave id 2); nothing to store
            self.init_state[chip] = INIT_ICW4 if self.init4[chip] else INIT_NONE
        else:
            self.auto_eoi[chip] = 1 if value & ICW4_AEOI else 0
            self.special_fully_nested_mode[chip] = 1 if value & ICW4_SFNM else 0
            if not value & 0x01:
                self._unimp("ICW4 8080/8085 mode")
            self.init_state[chip] = INIT_NONE

    def _write_ocw2(self, chip: int, value: int) -> None:
        command = value >> 5
        level = value & 7
        if command in (0b001, 0b101):            # non-specific EOI (with rotation)
            rank = _lowest_priority_index(self.isr[chip], self.priority_add[chip])
            if rank != 8:
                irq = (rank + self.priority_add[chip]) & 7
                self.isr[chip] &= ~(1 << irq) & 0xFF
                if command == 0b101:
                    self.priority_add[chip] = (irq + 1) & 7
        elif command in (0b011, 0b111):          # specific EOI (with rotation)
            self.isr[chip] &= ~(1 << level) & 0xFF
            if command == 0b111:
                self.priority_add[chip] = (level + 1) & 7
        elif command == 0b100:                   # set rotate in automatic EOI mode
            self.rotate_on_auto_eoi[chip] = 1
        elif command == 0b000:                   # clear rotate in automatic EOI mode
            self.rotate_on_auto_eoi[chip] = 0
        elif command == 0b110:                   # set priority: IR level becomes lowest
            self.priority_add[chip] = (level + 1) & 7
        # 0b010: no operation

    def _write_ocw3(self, chip: int, value: int) -> None:
        if value & OCW3_POLL:
            self.poll[chip] = 1
        if value & OCW3_RR:
            self.read_reg_select[chip] = value & OCW3_RIS
        if value & OCW3_ESMM:
            self.special_mask[chip] = 1 if value & OCW3_SMM else 0
