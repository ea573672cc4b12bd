"""Migration blockers, per migration mode (QEMU: migrate_add_blocker / _normal / _modes).

A device or a configuration that cannot be migrated in some mode registers a blocker with
the reason QEMU would give; ``migrate`` refuses with the first one that applies to the
current mode, and ``query-migrate`` lists every reason in ``blocked-reasons``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

ALL_MODES = frozenset({"normal", "cpr-reboot"})


@dataclass(frozen=True)
class Blocker:
    reason: str
    modes: frozenset[str]


class BlockerRegistry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._blockers: list[Blocker] = []

    def add(self, reason: str, modes: frozenset[str] = ALL_MODES) -> Blocker:
        """Block ``modes`` (all by default) with ``reason``; returns a handle for :meth:`remove`."""
        b = Blocker(reason, frozenset(modes))
        with self._lock:
            self._blockers.append(b)
        return b

    def add_normal(self, reason: str) -> Blocker:
        """Block only ``normal`` mode (QEMU's migrate_add_blocker_normal)."""
        return self.add(reason, frozenset({"normal"}))

    def remove(self, blocker: Blocker) -> None:
        with self._lock:
            if blocker in self._blockers:
                self._blockers.remove(blocker)

    def first_for(self, mode: str) -> str | None:
        with self._lock:
            return next((b.reason for b in self._blockers if mode in b.modes), None)

    def reasons(self) -> list[str]:
        with self._lock:
            return [b.reason for b in self._blockers]
