"""QEMU's auto-converge as a policy."""

from __future__ import annotations

from pyvm.migration.policy import (Decision, MigrationSetup, Policy, RoundState,
                                   qemu_converged)


class AutoConverge(Policy):
    """QEMU's auto-converge (``migration/ram.c``, migration_trigger_throttle and
    mig_throttle_guest_down), following Jacobs & Hines' "Auto-Convergence for Live
    Migration" (KVM Forum 2013): every period of at least one second, if the guest
    dirtied more than ``trigger`` percent of the bytes sent in the period, twice in a
    row, throttle the vCPUs: ``initial`` percent first, then ``increment`` more each
    time, up to ``maximum``.  Sending and the switchover rule are QEMU's precopy.
    """

    name = "auto-converge"
    initial, increment, maximum, trigger = 20, 10, 99, 50   # QEMU's defaults

    def start(self, setup: MigrationSetup) -> None:
        super().start(setup)
        self.throttle = 0
        self.high = 0
        self.period_start = 0.0
        self.dirty_bytes = self.sent_bytes = 0

    def decide(self, state: RoundState) -> Decision:
        if state.round > 0 and qemu_converged(self.setup, state):
            return Decision.stop(self.throttle)
        if state.history:
            last = state.history[-1]
            self.dirty_bytes += last.dirtied * state.page_size
            self.sent_bytes += last.bytes_sent
        if state.round > 0 and state.elapsed - self.period_start >= 1.0:
            if self.dirty_bytes > self.sent_bytes * self.trigger / 100:
                self.high += 1
                if self.high >= 2:
                    step = self.increment if self.throttle else self.initial
                    self.throttle = min(self.throttle + step, self.maximum)
                    self.high = 0
            self.period_start = state.elapsed
            self.dirty_bytes = self.sent_bytes = 0
        return Decision(throttle_pct=self.throttle)
