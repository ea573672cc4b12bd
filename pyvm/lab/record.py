"""Record a running guest's dirty pages into a :class:`~pyvm.lab.trace.Trace`.

The guest runs in this process (:class:`pyvm.machine.Machine`); the recorder turns on
dirty logging the way precopy does (:meth:`Machine.start_dirty_log`, the native write
tracker of :mod:`pyvm.fastpath`) and every ``interval`` seconds takes the bitmaps on the
run-loop thread, between two time slices, exactly as precopy's sync does.  No
migration runs.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Callable, Sequence

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
           on_start: Callable[[Machine], None] | None = None,
           on_end: Callable[[Machine], None] | None = None) -> Trace:
    """Boot ``kernel`` with ``append``, let it run ``warmup`` seconds, then record
    ``duration`` seconds of dirty pages, one sample every ``interval`` seconds.

    ``on_sample(i, pages)`` is called after each sample (progress reports);
    ``on_start(machine)`` just before the first interval begins (to look at the RAM the
    recording starts from), ``on_end(machine)`` right after the last sample.
    """
    _check(interval, duration)
    cfg = MachineConfig(ram_size=ram_size, kernel=kernel, append=append or None, smp=smp,
                        serial=["null"], slice_ms=slice_ms)
    machine = Machine(cfg)
    machine.start()
    try:
        if warmup > 0:
            time.sleep(warmup)      # the guest's own start-up, not a condition to await
        trace = _sample(machine, interval, duration, on_sample, on_start, on_end)
    finally:
        _end(machine)
    return _finish(trace, kernel.rsplit("/", 1)[-1], append,
                   {"smp": smp, "slice_ms": slice_ms, "warmup_s": warmup})


def record_linux(workloads: Sequence[str], ram_size: int, interval: float, duration: float, *,
                 warmup: float = 0.5, slice_ms: float = 10.0,
                 on_sample: Callable[[int, int], None] | None = None,
                 on_start: Callable[[Machine], None] | None = None,
                 on_workload: Callable[[str], None] | None = None) -> list[Trace]:
    """Boot the Linux guest once and record each workload in turn
    (:mod:`pyvm.lab.linux_workloads`): type it at the shell, wait for its marker and then
    ``warmup`` seconds, record ``duration`` seconds, stop it.  One trace per workload."""
    from pyvm.lab.linux_workloads import (WorkloadConsole, linux_cmdline, linux_files,
                                          parse_workload, serial_path)

    _check(interval, duration)
    parsed = [parse_workload(w) for w in workloads]
    kernel, initrd = linux_files()
    traces: list[Trace] = []
    with tempfile.TemporaryDirectory(prefix="pyvm-lab-") as tmp:
        sock = serial_path(tmp)
        cfg = MachineConfig(ram_size=ram_size, kernel=kernel, initrd=initrd,
                            append=linux_cmdline(), serial=[f"unix:{sock},server=on,wait=off"],
                            slice_ms=slice_ms)
        machine = Machine(cfg)
        machine.start()
        console = None
        try:
            console = WorkloadConsole(sock)
            for wl, spec in zip(parsed, workloads):
                if on_workload is not None:
                    on_workload(spec)
                t_boot = time.monotonic()
                console.start(wl)
                ready_s = time.monotonic() - t_boot
                if warmup > 0:
                    time.sleep(warmup)  # the workload's steady state, not a condition
                trace = _sample(machine, interval, duration, on_sample, on_start, None)
                if machine.exit_code is None and wl.name != "idle":
                    console.stop()
                traces.append(_finish(trace, "linux", spec, {
                    "workload": spec, "slice_ms": slice_ms, "warmup_s": warmup,
                    "ready_s": round(ready_s, 3), "kernel": os.path.basename(kernel)}))
        finally:
            if console is not None:
                console.close()
            _end(machine)
    return traces


def _check(interval: float, duration: float) -> None:
    if interval <= 0 or duration <= 0:
        raise LabError("record: interval and duration must be positive")


def _end(machine: Machine) -> None:
    if machine.exit_code is None:
        machine.stop_dirty_log()
    machine.request_exit(0)
    machine.close()


def _finish(t: "_Taken", guest: str, append: str, notes: dict[str, object]) -> Trace:
    notes = {**notes, "max_late_ms": round(t.late * 1e3, 3)}
    if t.exit_code is not None:
        notes["guest_exited"] = t.exit_code
    if t.taken == 0:
        raise LabError(f"record: the guest ended (status {t.exit_code}) before the first sample")
    return Trace(t.rows[:t.taken], t.npages, t.interval, guest=guest, append=append,
                 pyvm_version=__version__, notes=notes, busy=t.busy[:t.taken])


class _Taken:
    def __init__(self, rows: npt.NDArray[np.uint8], npages: int, interval: float) -> None:
        self.rows, self.npages, self.interval = rows, npages, interval
        self.busy = np.full(rows.shape[0], np.nan, dtype=np.float32)
        self.taken = 0
        self.late = 0.0
        self.exit_code: int | None = None


def _sample(machine: Machine, interval: float, duration: float,
            on_sample: Callable[[int, int], None] | None,
            on_start: Callable[[Machine], None] | None,
            on_end: Callable[[Machine], None] | None) -> _Taken:
    """Turn on dirty logging on a running machine and take ``duration / interval``
    samples; dirty logging is off again afterwards."""
    samples = max(1, int(round(duration / interval)))
    blocks = list(machine.ram)
    npages = sum(b.npages for b in blocks)
    out = _Taken(np.zeros((samples, (npages + 7) // 8), dtype=np.uint8), npages, interval)

    def take() -> tuple[list[npt.NDArray[np.uint64]], int, int]:
        # on the run loop, between two time slices: the vCPUs' run time is settled
        return ([b.dirty.fetch_and_clear() for b in blocks], time.monotonic_ns(),
                sum(machine.cpu_run_ns))

    ncpus = max(1, len(machine.cpu_run_ns))
    machine.start_dirty_log(blocks)
    # start_dirty_log marks every page: not a guest write
    _, then_ns, ran_ns = machine.run_on_loop(take)
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
        out.late = max(out.late, time.monotonic() - deadline)
        if machine.exit_code is not None:
            break               # the guest ended: keep the samples taken so far
        try:
            words, now_ns, run_ns = machine.run_on_loop(take, timeout=max(5.0, 10 * interval))
        except TimeoutError:
            if machine.exit_code is not None:
                break           # it ended between the check and the request
            raise LabError("record: the guest's run loop stopped answering") from None
        out.taken = i + 1
        if now_ns > then_ns:
            # the share of the sample's wall time the vCPUs ran guest code (not halted,
            # not sleeping off a throttle)
            out.busy[i] = min(1.0, (run_ns - ran_ns) / ((now_ns - then_ns) * ncpus))
        then_ns, ran_ns = now_ns, run_ns
        mask = np.concatenate([words_to_mask(w, b.npages) for w, b in zip(words, blocks)])
        out.rows[i] = np.packbits(mask)
        if on_sample is not None:
            on_sample(i, int(np.count_nonzero(mask)))
    out.exit_code = machine.exit_code
    if on_end is not None and out.exit_code is None:
        on_end(machine)
    if out.exit_code is None:
        machine.stop_dirty_log()
    return out
