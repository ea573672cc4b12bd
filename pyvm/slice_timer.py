"""Ends vCPU time slices: at a deadline, or as soon as something needs the run loop.

The stop itself is exact: this timer only raises the vCPU's stop flag, and the native
block hook (:func:`pyvm.fastpath.slice_stopper`) ends the run at the next translation
block on the vCPU's own thread.  A flag raised before the run starts is not lost: the
first block of the run consumes it.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Stoppable(Protocol):
    def request_stop(self) -> None: ...

    def clear_stop(self) -> None: ...


class SliceTimer:
    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._cpu: Stoppable | None = None
        self._deadline = 0.0
        self._kicked = False
        self._fired = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="slice-timer", daemon=True)
        self._thread.start()

    def begin(self, cpu: Stoppable, deadline: float) -> None:
        """A slice of ``cpu`` starts; it must end by ``deadline`` (time.monotonic())."""
        with self._cond:
            cpu.clear_stop()
            if self._kicked:
                cpu.request_stop()
            self._cpu = cpu
            self._deadline = deadline
            self._fired = False
            self._cond.notify()

    def end(self) -> None:
        with self._cond:
            self._cpu = None

    def kick(self) -> None:
        """End the current slice now (any thread); the loop sees it via :meth:`take_kick`."""
        with self._cond:
            self._kicked = True
            if self._cpu is not None:
                self._cpu.request_stop()

    def take_kick(self) -> bool:
        with self._cond:
            k, self._kicked = self._kicked, False
            return k

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                cpu = self._cpu
                if cpu is None or self._fired:
                    self._cond.wait()
                    continue
                now = time.monotonic()
                if now >= self._deadline:
                    cpu.request_stop()
                    self._fired = True
                else:
                    self._cond.wait(self._deadline - now)
