"""``-d LIST`` / ``-D FILE`` logging, QEMU style: topics enabled by name, one file."""

from __future__ import annotations

import sys
import threading
from typing import TextIO

from pyvm.errors import ConfigError
from pyvm.private_files import open_private_text

TOPICS = {
    "unimp": "log unimplemented device accesses (each port once)",
    "guest_errors": "log guest faults and bad device programming",
    "int": "log interrupts and exceptions delivered to the guest",
    "cpu_reset": "log CPU state at reset and at boot",
    "ioport": "log every port access (slow)",
    "migration": "log migration progress",
}


class Log:
    def __init__(self, topics: str = "", filename: str | None = None) -> None:
        self.enabled: set[str] = set()
        for t in filter(None, topics.split(",")):
            if t == "help":
                raise ConfigError("Log items (comma separated):\n" +
                                  "\n".join(f"{k:<14}{v}" for k, v in TOPICS.items()))
            if t not in TOPICS:
                raise ConfigError(f"-d {topics}: unknown log item '{t}' (try -d help)")
            self.enabled.add(t)
        self._out: TextIO = sys.stderr
        if filename:
            try:
                self._out = open_private_text(filename, append=True)   # mode 0600
            except OSError as err:
                raise ConfigError(f"-D {filename}: {err.strerror}") from err
        self._once: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def on(self, topic: str) -> bool:
        return topic in self.enabled

    def log(self, topic: str, message: str) -> None:
        if topic in self.enabled:
            with self._lock:
                self._out.write(message.rstrip("\n") + "\n")

    def once(self, topic: str, message: str) -> None:
        if topic in self.enabled and (topic, message) not in self._once:
            self._once.add((topic, message))
            self.log(topic, message)
