"""Regression: a kick that ended a slice inside an interrupt handler (IF=0) was taken for
HLT; the vCPU was marked halted with interrupts off and the run loop spun at 100% CPU
with an IRQ pending that it could never deliver."""

from __future__ import annotations

from tests.conftest import DEBUG_EXIT, guest, run_pyvm


def test_timer_guest_always_finishes() -> None:
    for _ in range(8):
        r = run_pyvm("-m", "16M", "-kernel", guest("timer-pm.elf"), "-serial", "null", *DEBUG_EXIT,
                     timeout=20)
        assert r.returncode == 0x21, r.stderr
