"""Loading pyvm's compiled extensions, each of which has a pure-Python twin.

``PYVM_PURE_PYTHON=1`` (or ``yes``/``true``) makes every loader here answer None, so
the twins run alone; an extension that was not built answers None too.
"""

from __future__ import annotations

import importlib
import os
from typing import Any


def pure_python() -> bool:
    """Whether ``PYVM_PURE_PYTHON`` asks for the twins."""
    return os.environ.get("PYVM_PURE_PYTHON", "") in ("1", "yes", "true")


def load_native(name: str) -> Any:
    """The extension module ``name`` (e.g. ``"pyvm._pit"``), or None where its twin is
    to be used."""
    if pure_python():
        return None
    try:
        return importlib.import_module(name)
    except ImportError:  # not built: the twin gives the same answers
        return None
