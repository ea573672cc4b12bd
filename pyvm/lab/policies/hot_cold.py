"""Hot/cold ordering: cold pages early, the hottest kept for the final copy."""

from __future__ import annotations

import numpy as np

from pyvm.migration.policy import Decision, MigrationSetup, Policy, RoundState, qemu_converged


class HotCold(Policy):
    """Ma, Liu & Liu, "Live Virtual Machine Migration Based on Improved Pre-copy
    Approach", ICSESS 2010: count how often each page is dirtied; send rarely-written
    pages first and hold back the pages dirtied in at least ``hot_share`` of the rounds
    so far, which would only be sent again; they go in the final copy.  Stop by QEMU's
    rule, or once only hot pages are left after ``min_rounds`` (at most ``max_rounds``).
    """

    name = "hot-cold"
    hot_share = 0.5
    min_rounds, max_rounds = 3, 30

    def start(self, setup: MigrationSetup) -> None:
        super().start(setup)
        self.writes = np.zeros(setup.npages, dtype=np.int32)

    def decide(self, state: RoundState) -> Decision:
        if state.round > 0:
            self.writes += state.dirty
        if state.round > 0 and qemu_converged(self.setup, state):
            return Decision.stop()
        learning = state.round < self.min_rounds
        hot = self.writes >= (state.round + 1 if learning else self.hot_share * state.round)
        cold = np.flatnonzero(state.unsent & ~hot)
        if state.round >= self.max_rounds or (not learning and cold.size == 0):
            return Decision.stop()
        order = np.argsort(self.writes[cold], kind="stable")
        return Decision(send=cold[order])
