"""Precopy that switches to postcopy when it stops converging."""

from __future__ import annotations

from pyvm.migration.policy import Decision, MigrationSetup, Policy, RoundState, qemu_converged


class HybridPostcopy(Policy):
    """Hines & Gopalan, "Post-Copy Based Live Virtual Machine Migration Using Adaptive
    Pre-Paging and Dynamic Self-Ballooning", VEE 2009, with the hybrid switch of Sahni &
    Varma, "A Hybrid Approach to Live Migration of Virtual Machines", CCEM 2012.

    Precopy as QEMU does; but when ``patience`` rounds in a row fail to shrink the unsent
    set below ``progress`` of the round before (the dirty rate matches the link), stop
    iterating and switch to postcopy: the destination runs at once and pulls the rest.
    """

    name = "hybrid-postcopy"
    patience = 2
    progress = 0.9          # a round must leave < 90% of the previous unsent bytes

    def start(self, setup: MigrationSetup) -> None:
        super().start(setup)
        self.stalled = 0
        self.before = setup.npages + 1

    def decide(self, state: RoundState) -> Decision:
        if state.round > 0 and qemu_converged(self.setup, state):
            return Decision.stop()
        unsent = state.unsent_bytes // state.page_size
        if state.round > 1:
            self.stalled = self.stalled + 1 if unsent >= self.progress * self.before else 0
            if self.stalled >= self.patience:
                return Decision.switch_to_postcopy()
        self.before = unsent
        return Decision()
