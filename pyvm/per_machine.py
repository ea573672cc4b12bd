"""One helper object per machine, made on first use: the dirty-rate calculator and the
dirty-limit controller each own a thread for a machine, and the machine's shutdown stops
them (pyvm.migration.control.service)."""

from __future__ import annotations

import threading
import weakref
from typing import Callable, Generic, Protocol, TypeVar


class Stoppable(Protocol):
    def shutdown(self) -> None: ...


K = TypeVar("K")
T = TypeVar("T", bound=Stoppable)


class PerMachine(Generic[K, T]):
    """``of(machine)`` gives the machine's object, made by ``factory`` the first time;
    the map holds machines weakly, so a closed machine does not stay alive for it."""

    def __init__(self, factory: Callable[[K], T]) -> None:
        self._factory = factory
        self._objects: "weakref.WeakKeyDictionary[K, T]" = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def of(self, machine: K) -> T:
        with self._lock:
            obj = self._objects.get(machine)
            if obj is None:
                obj = self._objects[machine] = self._factory(machine)
            return obj

    def shutdown(self, machine: K) -> None:
        """Stop the machine's object, if it was ever made."""
        with self._lock:
            obj = self._objects.get(machine)
        if obj is not None:
            obj.shutdown()
