"""The hot guest of the convergence tests and bench: ``store-loop`` rewriting 32 MiB.

store-loop (firmware/store-loop.s) stores the pass number into every word of its range
in ascending order, forever: EAX counts passes (it is incremented as a pass begins),
ECX is the range in words and EDX the words left in the current pass.  So the words it
has stored so far, its own progress counter, are ``EAX * ECX - EDX``.
"""

from __future__ import annotations

import re
import time
from typing import Any

from pyvm.guests import guest_path

HOT_MIB = 32
RAM_MIB = 64
#: words stored by one whole pass over the range
ONE_PASS = HOT_MIB * (1 << 20) // 4
HOT_ARGS = ["-m", f"{RAM_MIB}M", "-kernel", guest_path("store-loop.elf"),
            "-append", f"start=1 size={HOT_MIB}", "-display", "none"]

_REG = re.compile(r"\b(EAX|ECX|EDX)=([0-9a-fA-F]+)")


def words_stored(vm: Any, cpu: int = 0) -> int:
    """The guest's progress counter, read with ``info registers`` (HMP)."""
    out = vm.hmp(f"info registers -c {cpu}" if cpu else "info registers")
    regs = {name: int(value, 16) for name, value in _REG.findall(out)}
    return regs["EAX"] * regs["ECX"] - regs["EDX"]


def progress_rate(vm: Any, seconds: float) -> float:
    """Words stored per second over ``seconds`` of wall time."""
    t0, w0 = time.monotonic(), words_stored(vm)
    time.sleep(seconds)
    t1, w1 = time.monotonic(), words_stored(vm)
    return (w1 - w0) / (t1 - t0)
