"""Recording real guests (dirty.elf) from the native dirty tracker: the traces show the
pattern the guest was asked for."""

from __future__ import annotations

import numpy as np

from pyvm.guests import guest_path
from pyvm.lab.record import record, words_to_mask

RANGE = slice(256, 256 + 1024)          # start=1 size=4: pages 256..1279


def _record(append: str, duration: float = 0.6) -> np.ndarray:
    tr = record(guest_path("dirty.elf"), append, 16 << 20, 0.05, duration, warmup=0.2)
    assert tr.npages == 4096 and tr.interval == 0.05 and tr.guest == "dirty.elf"
    assert tr.samples == round(duration / 0.05)
    return np.stack([tr.mask(i) for i in range(tr.samples)])


def _outside(masks: np.ndarray) -> np.ndarray:
    out = masks.copy()
    out[:, RANGE] = False
    return out


def test_words_to_mask_follows_the_native_bit_order() -> None:
    words = np.array([1 | (1 << 63), 1 << 2], dtype=np.uint64)
    assert np.flatnonzero(words_to_mask(words, 128)).tolist() == [0, 63, 66]


def test_sweep_guest_dirties_one_ascending_run_per_sample() -> None:
    masks = _record("start=1 size=4 pattern=2 rate=40")
    inside = masks[:, RANGE]
    assert inside.sum() > 0
    for row in inside:
        idx = np.flatnonzero(row)
        if idx.size:     # one run, possibly wrapping around the end of the range
            gaps = np.count_nonzero(np.diff(idx) != 1)
            assert gaps == 0 or (gaps == 1 and idx[0] == 0 and idx[-1] == 1023), idx
            assert idx.size <= 4 * 40 + 40 * 6     # rate 40/tick: about 200 a sample
    # outside the range only the guest's own variables and stack, below 1 MiB
    assert np.flatnonzero(_outside(masks).any(axis=0)).max() < 256
    assert _outside(masks).sum(axis=1).max() <= 4


def test_hot_cold_guest_writes_the_hot_tenth_most() -> None:
    masks = _record("start=1 size=4 pattern=1 rate=30 hot=10 hotpct=90")
    inside = masks[:, RANGE].mean(axis=0)
    hot, cold = inside[:102].mean(), inside[102:].mean()
    assert hot > 5 * cold > 0


def test_idle_guest_writes_nothing_in_its_range() -> None:
    masks = _record("start=1 size=4 pattern=4", duration=0.4)
    assert masks[:, RANGE].sum() == 0
    assert masks.sum(axis=1).max() <= 4


def test_busy_fraction_tells_an_idle_guest_from_a_busy_one() -> None:
    """Version 2 traces hold each sample's vCPU busy fraction (run time over wall time)."""
    fractions = {}
    for name, append in (("idle", "start=1 size=4 pattern=4"),
                         ("busy", "start=1 size=4 pattern=0 rate=100000")):
        tr = record(guest_path("dirty.elf"), append, 16 << 20, 0.05, 0.3, warmup=0.2)
        assert tr.busy is not None and tr.busy.shape == (tr.samples,)
        assert np.isfinite(tr.busy).all() and (tr.busy >= 0).all() and (tr.busy <= 1).all()
        fractions[name] = tr.mean_busy()
    # the idle guest halts between its timer ticks; the other cannot finish a tick's writes
    assert fractions["idle"] < 0.2 < 0.4 < fractions["busy"], fractions
