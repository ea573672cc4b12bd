"""Xen's precopy with page skipping."""

from __future__ import annotations

import numpy as np

from pyvm.migration.policy import Decision, MigrationSetup, Policy, RoundState

MAX_ROUNDS = 29          # Xen's max_iters (tools/libxc/xc_domain_save.c)
MIN_PAGES = 50           # Xen stops when fewer pages than this are dirty
MAX_FACTOR = 3           # ... or when it has sent 3 times the RAM (max_factor)


class XenSkip(Policy):
    """Clark et al., "Live Migration of Virtual Machines", NSDI 2005, section 4.

    Each round sends the pages dirtied in the previous round *except* those dirtied
    again since (Xen peeks at the live bitmap and skips them: they would only be sent
    twice).  With a sync per round, "dirtied again" is a page dirty in both of the last
    two syncs; it stays unsent for a later round or the final copy.  Xen's stop rule:
    few pages left, the round limit, or three times the RAM sent.
    """

    name = "xen-skip"

    def start(self, setup: MigrationSetup) -> None:
        super().start(setup)
        self.previous = np.zeros(setup.npages, dtype=np.bool_)

    def decide(self, state: RoundState) -> Decision:
        left = int(np.count_nonzero(state.unsent))
        sent = sum(r.pages_sent for r in state.history)
        if state.round > 0 and (left < MIN_PAGES or state.round >= MAX_ROUNDS
                                or sent > MAX_FACTOR * self.setup.npages):
            return Decision.stop()
        hot = state.dirty & self.previous if state.round > 1 else np.zeros_like(state.dirty)
        self.previous = state.dirty.copy()
        return Decision(send=np.flatnonzero(state.unsent & ~hot))
