"""The guest images pyvm ships (built from ``firmware/`` by ``make -C firmware``)."""

from __future__ import annotations

import os

from pyvm.errors import ConfigError

GUESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def guest_path(name: str) -> str:
    """Path of a packaged guest image, e.g. ``guest_path("hello.elf")``."""
    path = os.path.join(GUESTS_DIR, name)
    if not os.path.exists(path):
        raise ConfigError(f"guest image '{name}' is missing: run 'make -C firmware'")
    return path
