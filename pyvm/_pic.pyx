# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The 8259A pair's hot paths in C: the twin of :class:`pyvm.devices.pic8259.PicPair`'s
``set_irq``, ``has_pending``, ``acknowledge`` and port I/O.

Every timer tick raises IRQ 0, runs an INTA cycle and an EOI write; in Python that is
dozens of method calls over the registers.  These functions do the same steps in C on
the very same state: the device's register lists (``irr``, ``isr``... one entry per chip,
the attributes its vmsd describes), read and written in place.  Nothing is cached here,
so a reset, a migration load or a test that assigns a register sees no difference, and
the device stays the one owner of its state.  The Python methods remain the reference
(``PYVM_PURE_PYTHON=1`` or ``PYVM_DELIVERY=python`` select them); a test drives both
over generated command sequences and compares every register after every step.
References as in pyvm/devices/pic8259.py: Intel 8259A datasheet (order no. 231468).
"""

cdef enum:
    MASTER = 0
    SLAVE = 1
    CASCADE_IRQ = 2
    ICW1_IC4 = 0x01
    ICW1_SNGL = 0x02
    ICW1_LTIM = 0x08
    ICW1_INIT = 0x10
    ICW4_AEOI = 0x02
    ICW4_SFNM = 0x10
    OCW3_RIS = 0x01
    OCW3_RR = 0x02
    OCW3_POLL = 0x04
    OCW3_SMM = 0x20
    OCW3_ESMM = 0x40
    INIT_NONE = 0
    INIT_ICW2 = 1
    INIT_ICW3 = 2
    INIT_ICW4 = 3


cdef inline long _get(list regs, int chip):
    return <long>regs[chip]


cdef inline int _lowest_priority_index(long bits, long priority_add):
    cdef int rank
    if bits == 0:
        return 8
    for rank in range(8):
        if bits & (1 << ((rank + priority_add) & 7)):
            return rank
    return 8


cdef inline bint _is_level(object p, int chip, long mask):
    return _get(p.ltim, chip) != 0 or (_get(p.elcr, chip) & mask) != 0


cdef int _chip_irq(object p, int chip):
    cdef long imr = _get(p.imr, chip)
    cdef long pending = _get(p.irr, chip) & ~imr & 0xFF
    cdef long prio = _get(p.priority_add, chip)
    cdef int rank = _lowest_priority_index(pending, prio)
    cdef long in_service
    if rank == 8:
        return -1
    in_service = _get(p.isr, chip)
    if _get(p.special_mask, chip):
        in_service &= ~imr
    if chip == MASTER and _get(p.special_fully_nested_mode, MASTER):
        in_service &= ~(1 << CASCADE_IRQ)
    if rank < _lowest_priority_index(in_service, prio):
        return (rank + prio) & 7
    return -1


cdef void _set_input(object p, int chip, int n, bint level):
    cdef long mask = 1 << n
    cdef list irr = p.irr
    cdef list last_irr = p.last_irr
    if _is_level(p, chip, mask):
        if level:
            irr[chip] = _get(irr, chip) | mask
        else:
            irr[chip] = _get(irr, chip) & ~mask & 0xFF
    elif level and not _get(last_irr, chip) & mask:
        irr[chip] = _get(irr, chip) | mask
    if level:
        last_irr[chip] = _get(last_irr, chip) | mask
    else:
        last_irr[chip] = _get(last_irr, chip) & ~mask & 0xFF


cdef _update(object p, bint kick=True):
    cdef bint out
    cdef long mask = 1 << CASCADE_IRQ
    cdef list irr, last_irr
    if not _get(p.single_mode, MASTER):
        irr = p.irr
        last_irr = p.last_irr
        if _chip_irq(p, SLAVE) >= 0:
            irr[MASTER] = _get(irr, MASTER) | mask
            last_irr[MASTER] = _get(last_irr, MASTER) | mask
        else:
            irr[MASTER] = _get(irr, MASTER) & ~mask & 0xFF
            last_irr[MASTER] = _get(last_irr, MASTER) & ~mask & 0xFF
    out = _chip_irq(p, MASTER) >= 0
    if out and not p._int_out and kick and p.ctx is not None:
        p.ctx.kick()
    p._int_out = out


cdef void _intack(object p, int chip, int irq):
    cdef long mask = 1 << irq
    cdef list irr
    if _get(p.auto_eoi, chip):
        if _get(p.rotate_on_auto_eoi, chip):
            p.priority_add[chip] = (irq + 1) & 7
    else:
        p.isr[chip] = _get(p.isr, chip) | mask
    if not (chip == MASTER and irq == CASCADE_IRQ) and not _is_level(p, chip, mask):
        irr = p.irr
        irr[chip] = _get(irr, chip) & ~mask & 0xFF


def set_irq(object p, int line, bint level):
    """PicPair.set_irq."""
    _set_irq(p, line, level, True)


def set_irq_on_loop(object p, int line, bint level):
    """PicPair.set_irq from the run loop's own thread between runs (pyvm/_idle.pyx): the
    same, without the kick a rising INT output sends, which the loop would ignore there
    (Machine.kick returns at once on the loop thread when no vCPU runs)."""
    _set_irq(p, line, level, False)


cdef _set_irq(object p, int line, bint level, bint kick):
    cdef list seen
    if not 0 <= line <= 15:
        raise ValueError(f"ISA IRQ line {line} out of range 0-15")
    seen = p._irq_level
    if level and not seen[line]:
        p.irq_count[line] += 1
    seen[line] = level
    _set_input(p, line >> 3, line & 7, level)
    _update(p, kick)


def has_pending(object p):
    """PicPair.has_pending."""
    return _chip_irq(p, MASTER) >= 0


def acknowledge(object p):
    """PicPair.acknowledge (the INTA cycle)."""
    cdef int irq = _chip_irq(p, MASTER), slave_irq
    cdef long vector
    if irq < 0:
        vector = (_get(p.irq_base, MASTER) + 7) & 0xFF
    elif irq == CASCADE_IRQ and not _get(p.single_mode, MASTER):
        slave_irq = _chip_irq(p, SLAVE)
        if slave_irq >= 0:
            _intack(p, SLAVE, slave_irq)
            vector = (_get(p.irq_base, SLAVE) + slave_irq) & 0xFF
        else:
            vector = (_get(p.irq_base, SLAVE) + 7) & 0xFF
        _intack(p, MASTER, irq)
    else:
        _intack(p, MASTER, irq)
        vector = (_get(p.irq_base, MASTER) + irq) & 0xFF
    _update(p)
    return vector


cdef long _poll_read(object p, int chip):
    cdef int irq = _chip_irq(p, chip)
    if irq < 0:
        return 0
    _intack(p, chip, irq)
    _update(p)
    return 0x80 | irq


cdef long _read_byte(object p, long port):
    cdef int chip
    if port == 0x4D0 or port == 0x4D1:
        return _get(p.elcr, port - 0x4D0)
    if port != 0x20 and port != 0x21 and port != 0xA0 and port != 0xA1:
        return 0xFF
    chip = MASTER if port < 0xA0 else SLAVE
    if _get(p.poll, chip):
        p.poll[chip] = 0
        return _poll_read(p, chip)
    if port & 1:
        return _get(p.imr, chip)
    return _get(p.isr, chip) if _get(p.read_reg_select, chip) else _get(p.irr, chip)


cdef _init_reset(object p, int chip):
    p.irr[chip] = _get(p.last_irr, chip) & (0xFF if _get(p.ltim, chip) else _get(p.elcr, chip))
    p.imr[chip] = 0
    p.isr[chip] = 0
    p.priority_add[chip] = 0
    p.irq_base[chip] = 0
    p.read_reg_select[chip] = 0
    p.poll[chip] = 0
    p.special_mask[chip] = 0
    p.init_state[chip] = INIT_NONE
    p.auto_eoi[chip] = 0
    p.rotate_on_auto_eoi[chip] = 0
    p.special_fully_nested_mode[chip] = 0
    p.init4[chip] = 0
    p.single_mode[chip] = 0


cdef _write_icw1(object p, int chip, long value):
    p.ltim[chip] = 1 if value & ICW1_LTIM else 0
    _init_reset(p, chip)
    p.single_mode[chip] = 1 if value & ICW1_SNGL else 0
    p.init4[chip] = 1 if value & ICW1_IC4 else 0
    p.init_state[chip] = INIT_ICW2
    if value & 0x04:
        p._unimp("ICW1 call address interval 4 (8080 mode)")


cdef _write_data(object p, int chip, long value):
    cdef long state = _get(p.init_state, chip)
    if state == INIT_NONE:
        p.imr[chip] = value
    elif state == INIT_ICW2:
        p.irq_base[chip] = value & 0xF8
        if not _get(p.single_mode, chip):
            p.init_state[chip] = INIT_ICW3
        elif _get(p.init4, chip):
            p.init_state[chip] = INIT_ICW4
        else:
            p.init_state[chip] = INIT_NONE
    elif state == INIT_ICW3:
        p.init_state[chip] = INIT_ICW4 if _get(p.init4, chip) else INIT_NONE
    else:
        p.auto_eoi[chip] = 1 if value & ICW4_AEOI else 0
        p.special_fully_nested_mode[chip] = 1 if value & ICW4_SFNM else 0
        if not value & 0x01:
            p._unimp("ICW4 8080/8085 mode")
        p.init_state[chip] = INIT_NONE


cdef _write_ocw2(object p, int chip, long value):
    cdef long command = value >> 5
    cdef long level = value & 7
    cdef int rank, irq
    cdef list isr
    if command == 0b001 or command == 0b101:
        isr = p.isr
        rank = _lowest_priority_index(_get(isr, chip), _get(p.priority_add, chip))
        if rank != 8:
            irq = (rank + _get(p.priority_add, chip)) & 7
            isr[chip] = _get(isr, chip) & ~(1 << irq) & 0xFF
            if command == 0b101:
                p.priority_add[chip] = (irq + 1) & 7
    elif command == 0b011 or command == 0b111:
        isr = p.isr
        isr[chip] = _get(isr, chip) & ~(1 << level) & 0xFF
        if command == 0b111:
            p.priority_add[chip] = (level + 1) & 7
    elif command == 0b100:
        p.rotate_on_auto_eoi[chip] = 1
    elif command == 0b000:
        p.rotate_on_auto_eoi[chip] = 0
    elif command == 0b110:
        p.priority_add[chip] = (level + 1) & 7


cdef _write_ocw3(object p, int chip, long value):
    if value & OCW3_POLL:
        p.poll[chip] = 1
    if value & OCW3_RR:
        p.read_reg_select[chip] = value & OCW3_RIS
    if value & OCW3_ESMM:
        p.special_mask[chip] = 1 if value & OCW3_SMM else 0


cdef _write_byte(object p, long port, long value):
    cdef int chip
    if port == 0x4D0 or port == 0x4D1:
        chip = port - 0x4D0
        p.elcr[chip] = value & (0xF8 if chip == MASTER else 0xDE)
        _update(p)
        return
    if port != 0x20 and port != 0x21 and port != 0xA0 and port != 0xA1:
        return
    chip = MASTER if port < 0xA0 else SLAVE
    if port & 1:
        _write_data(p, chip, value)
    elif value & ICW1_INIT:
        _write_icw1(p, chip, value)
    elif value & 0x08:
        _write_ocw3(p, chip, value)
    else:
        _write_ocw2(p, chip, value)
    _update(p)


def io_read(object p, long port, int size):
    """PicPair.io_read."""
    cdef long value = 0
    cdef int i
    for i in range(size):
        value |= _read_byte(p, port + i) << (8 * i)
    return value


def io_write(object p, long port, int size, long value):
    """PicPair.io_write."""
    cdef int i
    for i in range(size):
        _write_byte(p, port + i, (value >> (8 * i)) & 0xFF)
