"""The virtual clock (QEMU_CLOCK_VIRTUAL): nanoseconds that advance only while the VM runs.

Device deadlines are in this time base, so a paused or migrated VM does not see its timers
jump.  The clock's value travels in the migration stream (the ``timer`` section).
"""

from __future__ import annotations

import threading
import time

from pyvm.vmstate import Field, VMStateDescription


class VirtualClock:
    idstr = "timer"
    instance_id = 0
    vmsd = VMStateDescription(name="timer", version_id=2, minimum_version_id=1,
                              fields=(Field("cpu_ticks_offset", "int64"),
                                      Field("unused", "buffer", size=8),
                                      Field("cpu_clock_offset", "int64")))

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._frozen_at = 0          # virtual ns while stopped
        self._base: int | None = None  # monotonic ns minus virtual ns while running
        self.cpu_ticks_offset = 0
        self.unused = bytes(8)
        self.cpu_clock_offset = 0

    def now_ns(self) -> int:
        base = self._base
        if base is None:
            return self._frozen_at
        return time.monotonic_ns() - base

    @property
    def running(self) -> bool:
        return self._base is not None

    def start(self) -> None:
        with self._lock:
            if self._base is None:
                self._base = time.monotonic_ns() - self._frozen_at

    def stop(self) -> None:
        with self._lock:
            if self._base is not None:
                self._frozen_at = time.monotonic_ns() - self._base
                self._base = None

    def pre_save(self) -> None:
        self.cpu_clock_offset = self.now_ns()

    def post_load(self) -> None:
        with self._lock:
            was_running = self._base is not None
            self._frozen_at = self.cpu_clock_offset
            self._base = time.monotonic_ns() - self._frozen_at if was_running else None

    def reset(self) -> None:
        pass
