"""VM events (STOP, RESUME, SHUTDOWN, ...) fanned out to whoever listens (the QMP monitors).

Events are timestamped when emitted, with wall-clock time as QEMU does.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Event:
    name: str
    data: dict[str, Any] | None = None
    timestamp: float = field(default_factory=time.time)

    @property
    def seconds_micro(self) -> tuple[int, int]:
        sec = int(self.timestamp)
        return sec, int(round((self.timestamp - sec) * 1_000_000)) % 1_000_000


Subscriber = Callable[[Event], None]


class EventBus:
    """Thread-safe publish/subscribe of :class:`Event`; subscribers must not block."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: list[Subscriber] = []

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        with self._lock:
            self._subscribers.append(fn)

        def unsubscribe() -> None:
            with self._lock:
                if fn in self._subscribers:
                    self._subscribers.remove(fn)
        return unsubscribe

    def emit(self, name: str, data: dict[str, Any] | None = None) -> Event:
        ev = Event(name, data)
        with self._lock:
            subs = list(self._subscribers)
        for fn in subs:
            fn(ev)
        return ev
