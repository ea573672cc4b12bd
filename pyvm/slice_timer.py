"""Ends vCPU time slices: at a deadline, or at once when something needs the run loop.

Unicorn runs guest code until told to stop (``uc_emu_stop``).  One thread here waits for
the current slice's deadline and stops the engine then.  A stop that lands just before
the engine starts would be forgotten by Unicorn, so the stop is repeated every
``RETRY`` seconds until the run loop reports the slice finished.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Stoppable(Protocol):
    def kick(self) -> None: ...


class SliceTimer:
    RETRY = 0.0005

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._cpu: Stoppable | None = None
        self._deadline = 0.0
        self._kicked = False
        self._stopped_slice = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="slice-timer", daemon=True)
        self._thread.start()

    def begin(self, cpu: Stoppable, deadline: float) -> None:
        """A slice of ``cpu`` starts; it must end by ``deadline`` (time.monotonic())."""
        with self._cond:
            self._cpu = cpu
            self._deadline = deadline
            self._stopped_slice = False
            self._cond.notify()

    def end(self) -> bool:
        """The slice ended; returns True if this timer (or a kick) stopped it."""
        with self._cond:
            self._cpu = None
            stopped = self._stopped_slice
            self._stopped_slice = False
            return stopped

    def kick(self) -> None:
        """End the current slice now (any thread); also makes the next slice end at once."""
        with self._cond:
            self._kicked = True
            cpu = self._cpu
            if cpu is not None:
                self._stopped_slice = True
            self._cond.notify()
        if cpu is not None:
            cpu.kick()

    def take_kick(self) -> bool:
        """True once after :meth:`kick` was called (the run loop polls this)."""
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
                if cpu is None:
                    self._cond.wait()
                    continue
                now = time.monotonic()
                if self._kicked or now >= self._deadline:
                    self._stopped_slice = True
                    cpu.kick()
                    self._cond.wait(self.RETRY)
                else:
                    self._cond.wait(self._deadline - now)
