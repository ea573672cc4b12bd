"""8259A pair: initialisation, priorities, EOI, masking, cascade, trigger modes, save/load."""

from __future__ import annotations

import pytest

from pyvm.devices.pic8259 import PIC_VMSD, PicPair

MASTER_BASE, SLAVE_BASE = 0x20, 0x28
EOI = 0x20


def program(pic: PicPair, icw4: int = 0x01, master_base: int = MASTER_BASE,
            slave_base: int = SLAVE_BASE) -> None:
    """The usual PC initialisation: edge triggered, cascade, ICW4 needed."""
    pic.io_write(0x20, 1, 0x11)
    pic.io_write(0x21, 1, master_base)
    pic.io_write(0x21, 1, 0x04)         # slave on IR2
    pic.io_write(0x21, 1, icw4)
    pic.io_write(0xA0, 1, 0x11)
    pic.io_write(0xA1, 1, slave_base)
    pic.io_write(0xA1, 1, 0x02)         # slave id 2
    pic.io_write(0xA1, 1, icw4)
    pic.io_write(0x21, 1, 0x00)
    pic.io_write(0xA1, 1, 0x00)


@pytest.fixture
def pic(ctx) -> PicPair:
    p = PicPair()
    p.attach(ctx)
    p.reset()
    program(p)
    return p


def pulse(pic: PicPair, line: int) -> None:
    pic.set_irq(line, True)
    pic.set_irq(line, False)


def read_isr(pic: PicPair, port: int = 0x20) -> int:
    pic.io_write(port, 1, 0x0B)         # OCW3: read ISR
    value = pic.io_read(port, 1)
    pic.io_write(port, 1, 0x0A)         # back to IRR
    return value


def test_edge_request_is_acknowledged_with_programmed_vector(pic, ctx):
    assert not pic.has_pending()
    pulse(pic, 1)
    assert pic.has_pending()
    assert ctx.kicks >= 1
    assert pic.acknowledge() == MASTER_BASE + 1
    assert read_isr(pic) == 0x02
    assert not pic.has_pending()
    pic.io_write(0x20, 1, EOI)
    assert read_isr(pic) == 0


def test_icw2_low_bits_are_ignored_in_x86_mode(ctx):
    p = PicPair()
    p.attach(ctx)
    p.reset()
    program(p, master_base=0x23)
    pulse(p, 0)
    assert p.acknowledge() == 0x20


def test_lower_line_number_wins_and_higher_priority_nests(pic):
    pulse(pic, 3)
    pulse(pic, 1)
    assert pic.acknowledge() == MASTER_BASE + 1
    # IRQ 3 is lower priority than IRQ 1 in service: not presented
    assert not pic.has_pending()
    # IRQ 0 beats IRQ 1 in service: nests
    pulse(pic, 0)
    assert pic.has_pending()
    assert pic.acknowledge() == MASTER_BASE + 0
    assert read_isr(pic) == 0x03
    pic.io_write(0x20, 1, EOI)          # non-specific EOI clears the highest: IRQ 0
    assert read_isr(pic) == 0x02
    assert not pic.has_pending()
    pic.io_write(0x20, 1, EOI)
    assert pic.has_pending()
    assert pic.acknowledge() == MASTER_BASE + 3


def test_specific_eoi_clears_named_level(pic):
    pulse(pic, 4)
    pic.acknowledge()
    pulse(pic, 2 + 1)
    pic.acknowledge()
    assert read_isr(pic) == 0x18
    pic.io_write(0x20, 1, 0x60 | 4)     # specific EOI for IR4
    assert read_isr(pic) == 0x08


def test_mask_blocks_and_unmask_kicks(pic, ctx):
    pic.io_write(0x21, 1, 0x02)
    pulse(pic, 1)
    assert not pic.has_pending()
    assert pic.io_read(0x21, 1) == 0x02
    kicks = ctx.kicks
    pic.io_write(0x21, 1, 0x00)
    assert pic.has_pending()
    assert ctx.kicks == kicks + 1


def test_irr_and_isr_read_through_ocw3(pic):
    pulse(pic, 5)
    pulse(pic, 6)
    assert pic.io_read(0x20, 1) == 0x60         # IRR selected after init
    pic.acknowledge()
    assert pic.io_read(0x20, 1) == 0x40
    assert read_isr(pic) == 0x20


def test_edge_mode_needs_a_new_rising_edge(pic):
    pic.set_irq(1, True)
    pic.acknowledge()
    pic.io_write(0x20, 1, EOI)
    pic.set_irq(1, True)                # still high: no new edge
    assert not pic.has_pending()
    pic.set_irq(1, False)
    pic.set_irq(1, True)
    assert pic.has_pending()


def test_level_mode_via_elcr(pic):
    pic.io_write(0x4D1, 1, 0x02)        # IRQ 9 level triggered
    assert pic.io_read(0x4D1, 1) == 0x02
    pic.set_irq(9, True)
    assert pic.acknowledge() == SLAVE_BASE + 1
    pic.io_write(0xA0, 1, EOI)
    pic.io_write(0x20, 1, EOI)
    assert pic.has_pending()            # line still high: requested again
    pic.set_irq(9, False)
    assert not pic.has_pending()


def test_elcr_masks_edge_only_lines(pic):
    pic.io_write(0x4D0, 2, 0xFFFF)
    assert pic.io_read(0x4D0, 1) == 0xF8
    assert pic.io_read(0x4D1, 1) == 0xDE


def test_cascade_sets_isr_on_both_chips(pic):
    pulse(pic, 12)
    assert pic.has_pending()
    assert pic.acknowledge() == SLAVE_BASE + 4
    assert read_isr(pic, 0x20) == 0x04
    assert read_isr(pic, 0xA0) == 0x10
    pic.io_write(0xA0, 1, EOI)
    pic.io_write(0x20, 1, EOI)
    assert read_isr(pic, 0x20) == 0 and read_isr(pic, 0xA0) == 0


def test_slave_request_has_master_ir2_priority(pic):
    pulse(pic, 3)
    pulse(pic, 8)
    assert pic.acknowledge() == SLAVE_BASE + 0      # IR2 beats IR3
    assert not pic.has_pending()
    pic.io_write(0xA0, 1, EOI)
    pic.io_write(0x20, 1, EOI)
    assert pic.acknowledge() == MASTER_BASE + 3


def test_slave_masked_line_does_not_reach_master(pic):
    pic.io_write(0xA1, 1, 0x01)
    pulse(pic, 8)
    assert not pic.has_pending()
    pic.io_write(0xA1, 1, 0x00)
    assert pic.acknowledge() == SLAVE_BASE


def test_spurious_irq7_when_request_goes_away(pic):
    pic.io_write(0x4D0, 1, 0x20)        # IRQ 5 level triggered
    pic.set_irq(5, True)
    assert pic.has_pending()
    pic.set_irq(5, False)               # gone before INTA
    assert pic.acknowledge() == MASTER_BASE + 7
    assert read_isr(pic) == 0           # a spurious IRQ 7 sets no ISR bit


def test_auto_eoi_leaves_isr_clear(ctx):
    p = PicPair()
    p.attach(ctx)
    p.reset()
    program(p, icw4=0x03)
    pulse(p, 1)
    assert p.acknowledge() == MASTER_BASE + 1
    assert read_isr(p) == 0
    pulse(p, 3)
    assert p.has_pending()


def test_set_priority_rotates_order(pic):
    pic.io_write(0x20, 1, 0xC0 | 4)     # IR4 lowest, so IR5 highest
    pulse(pic, 1)
    pulse(pic, 6)
    assert pic.acknowledge() == MASTER_BASE + 6


def test_rotate_on_nonspecific_eoi(pic):
    pulse(pic, 1)
    pic.acknowledge()
    pic.io_write(0x20, 1, 0xA0)         # rotate on non-specific EOI: IR1 becomes lowest
    pulse(pic, 1)
    pulse(pic, 3)
    assert pic.acknowledge() == MASTER_BASE + 3


def test_poll_command(pic):
    pulse(pic, 6)
    pic.io_write(0x20, 1, 0x0C)         # OCW3 poll
    assert pic.io_read(0x20, 1) == 0x86
    assert read_isr(pic) == 0x40
    pic.io_write(0x20, 1, EOI)
    pic.io_write(0x20, 1, 0x0C)
    assert pic.io_read(0x20, 1) == 0x00


def test_special_mask_mode_lets_lower_levels_in(pic):
    pulse(pic, 1)
    pic.acknowledge()
    pic.io_write(0x21, 1, 0x02)         # mask the level in service
    pic.io_write(0x20, 1, 0x68)         # OCW3: set special mask mode
    pulse(pic, 5)
    assert pic.acknowledge() == MASTER_BASE + 5


def test_icw1_resets_mask_and_forgets_requests(pic):
    pic.io_write(0x21, 1, 0xF0)
    pulse(pic, 1)
    pic.io_write(0x20, 1, 0x11)
    pic.io_write(0x21, 1, MASTER_BASE)
    pic.io_write(0x21, 1, 0x04)
    pic.io_write(0x21, 1, 0x01)
    assert pic.io_read(0x21, 1) == 0x00
    assert not pic.has_pending()


def test_sixteen_bit_write_reaches_both_ports(ctx):
    p = PicPair()
    p.attach(ctx)
    p.reset()
    p.io_write(0x20, 2, 0x3013)         # ICW1 (single, ICW4) at 0x20, ICW2 0x30 at 0x21
    p.io_write(0x21, 1, 0x01)           # ICW4
    pulse(p, 2)
    assert p.acknowledge() == 0x32      # single mode: IR2 is an ordinary line


def test_save_and_load_preserve_pending_and_in_service(pic, ctx, vmsd_fits, migrate):
    pulse(pic, 3)
    pic.acknowledge()
    pulse(pic, 12)
    pic.pre_save()
    vmsd_fits(pic, PIC_VMSD)
    other = PicPair()
    other.attach(ctx)
    other.reset()
    migrate(pic, other)
    assert other.has_pending()          # IR2 (slave) beats IR3 in service
    assert other.acknowledge() == SLAVE_BASE + 4
    assert read_isr(other) == 0x0C


def test_bad_line_number_rejected(pic):
    with pytest.raises(ValueError):
        pic.set_irq(16, True)
