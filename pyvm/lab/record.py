"""Record a running guest's dirty pages into a :class:`~pyvm.lab.trace.Trace`.

The guest runs in this process (:class:`pyvm.machine.Machine`); the recorder turns on
dirty logging the way precopy does (:meth:`Machine.start_dirty_log`, the native write
tracker of :mod:`pyvm.fastpath`) and every ``interval`` seconds takes the bitmaps on the
run-loop thread, between two time slices, exactly as precopy's sync does.  No
migration runs.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import numpy.typing as npt

from pyvm import __version__
from pyvm.config import MachineConfig
from pyvm.lab.errors import LabError
from pyvm.lab.trace import Trace
from pyvm.machine import Machine


def words_to_mask(words: npt.NDArray[np.uint64], npages: int) -> npt.NDArray[np.bool_]:
    """A native dirty bitmap (bit p & 63 of word p >> 6) as one bool per page."""
    raw = np.ascontiguousarray(words, dtype="<u8").view(np.uint8)
    return np.unpackbits(raw, count=npages, bitorder="little").view(np.bool_)


def record(kernel: str, append: str, ram_size: int, interval: float, duration: float, *,
           smp: int = 1, warmup: float = 0.0, slice_ms: float = 10.0,
           on_sample: Callable[[int, int], None] | None = None,
           on_start: Callable[[Machine], None] | None = None) -> Trace:
    """Boot ``kernel`` with ``append``, let it run ``warmup`` seconds, then record
    ``duration`` seconds of dirty pages, one sample every ``interval`` seconds.

    ``on_sample(i, pages)`` is called after each sample (progress reports);
    ``on_start(machine)`` just before the first interval begins (to look at the RAM the
    recording starts from).
    """
    if interval <= 0 or duration <= 0:
        raise LabError("record: interval and duration must be positive")
    samples = max(1, int(round(duration / interval)))
    cfg = MachineConfig(ram_size=ram_size, kernel=kernel, append=append or None, smp=smp,
                        serial=["null"], slice_ms=slice_ms)
    machine = Machine(cfg)
    blocks = list(machine.ram)
    npages = sum(b.npages for b in blocks)
    rows = np.zeros((samples, (npages + 7) // 8), dtype=np.uint8)
    late = 0.0
    taken = 0

    def take() -> list[npt.NDArray[np.uint64]]:
        return [b.dirty.fetch_and_clear() for b in blocks]

    machine.start()
    try:
        if warmup > 0:
            time.sleep(warmup)      # the guest's own start-up, not a condition to await
        machine.start_dirty_log(blocks)
        machine.run_on_loop(take)   # start_dirty_log marks every page: not a guest write
        if on_start is not None:
            on_start(machine)
        t0 = time.monotonic()
        for i in range(samples):
            if machine.exit_code is not None:
                break
            deadline = t0 + (i + 1) * interval
            pause = deadline - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            late = max(late, time.monotonic() - deadline)
            if machine.exit_code is not None:
                break               # the guest ended: keep the samples taken so far
            try:
                words = machine.run_on_loop(take, timeout=max(5.0, 10 * interval))
            except TimeoutError:
                if machine.exit_code is not None:
                    break           # it ended between the check and the request
                raise LabError("record: the guest's run loop stopped answering") from None
            taken = i + 1
            mask = np.concatenate([words_to_mask(w, b.npages) for w, b in zip(words, blocks)])
            rows[i] = np.packbits(mask)
            if on_sample is not None:
                on_sample(i, int(np.count_nonzero(mask)))
        exit_code = machine.exit_code
    finally:
        if machine.exit_code is None:
            machine.stop_dirty_log()
        machine.request_exit(0)
        machine.close()
    notes = {"smp": smp, "slice_ms": slice_ms, "warmup_s": warmup,
             "max_late_ms": round(late * 1e3, 3)}
    if exit_code is not None:
        notes["guest_exited"] = exit_code
    if taken == 0:
        raise LabError(f"record: the guest ended (status {exit_code}) before the first sample")
    return Trace(rows[:taken], npages, interval, guest=kernel.rsplit("/", 1)[-1], append=append,
                 pyvm_version=__version__, notes=notes)
