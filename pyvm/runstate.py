"""Run states, named and ordered as QEMU's ``RunState`` (qapi/run-state.json).

One :class:`RunStateMachine` per VM holds the current state; the monitor, the run loop and
migration all read and change it through here so that STOP/RESUME events and
``query-status`` agree.
"""

from __future__ import annotations

import enum
import threading
from typing import Callable


class RunState(enum.Enum):
    """QEMU's RunState, in QAPI enum order."""

    DEBUG = "debug"
    INMIGRATE = "inmigrate"
    INTERNAL_ERROR = "internal-error"
    IO_ERROR = "io-error"
    PAUSED = "paused"
    POSTMIGRATE = "postmigrate"
    PRELAUNCH = "prelaunch"
    FINISH_MIGRATE = "finish-migrate"
    RESTORE_VM = "restore-vm"
    RUNNING = "running"
    SAVE_VM = "save-vm"
    SHUTDOWN = "shutdown"
    SUSPENDED = "suspended"
    WATCHDOG = "watchdog"
    GUEST_PANICKED = "guest-panicked"
    COLO = "colo"


Listener = Callable[[RunState, RunState], None]


class RunStateMachine:
    """The VM's current run state plus listeners called on every change.

    Listeners get ``(old, new)`` and run on the thread that made the change.
    """

    def __init__(self, initial: RunState = RunState.PRELAUNCH) -> None:
        self._state = initial
        self._lock = threading.RLock()
        self._listeners: list[Listener] = []
        self.changed = threading.Condition(self._lock)

    @property
    def state(self) -> RunState:
        return self._state

    @property
    def running(self) -> bool:
        return self._state is RunState.RUNNING

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def set(self, new: RunState) -> RunState:
        """Move to ``new``; returns the previous state."""
        with self._lock:
            old = self._state
            self._state = new
            self.changed.notify_all()
        if old is not new:
            for listener in list(self._listeners):
                listener(old, new)
        return old

    def wait_for(self, predicate: Callable[[RunState], bool], timeout: float | None = None) -> bool:
        with self._lock:
            return self.changed.wait_for(lambda: predicate(self._state), timeout)
