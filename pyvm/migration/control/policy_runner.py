"""The precopy engine's side of a migration policy (:mod:`pyvm.migration.policy`).

Precopy keeps its pages as ``(block, page indices)`` pairs; a policy sees one flat page
space (the migrated blocks one after the other, :class:`~pyvm.migration.policy.RamRegion`).
:class:`PolicyRunner` translates between the two, once per round:

* :meth:`PolicyRunner.decide` turns the pages still to send and the bitmaps of the last
  sync into a :class:`~pyvm.migration.policy.RoundState`, asks the policy, and checks the
  answer (:func:`~pyvm.migration.policy.call_decide`);
* :meth:`PolicyRunner.plan` splits the decision's page list back into per-block runs, in
  the policy's order (a block's run may be in any page order: every ``PAGE``/``ZERO``
  record carries its own address, ``migration/ram.c`` save_page_header), and says which
  pages stay unsent;
* :meth:`PolicyRunner.end_round` appends the finished round to the history.

A policy that raises, answers nonsense or asks for something this engine cannot do
raises :class:`~pyvm.migration.policy.PolicyError`; its message names the policy, and
precopy reports it as the migration's ``error-desc`` (the guest keeps running).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from pyvm.migration.policy import (PAGE_SIZE, Decision, Limits, LinkEstimate, MigrationSetup,
                                   Policy, PolicyError, RamRegion, RoundRecord, RoundState,
                                   call_decide, call_limits_changed, call_start, load_policy,
                                   parse_policy, policy_name)

if TYPE_CHECKING:
    from pyvm.ram import RamBlock

#: The policy when ``x-policy`` is unset: QEMU's precopy.
DEFAULT_POLICY = "qemu"

Pages = list[tuple["RamBlock", np.ndarray]]


def check_policy_text(text: str) -> None:
    """``migrate-set-parameters x-policy``: the reference must parse (it is loaded when a
    migration starts); raises :class:`PolicyError`."""
    if text:
        parse_policy(text)


def words_to_mask(words: np.ndarray, npages: int) -> np.ndarray:
    """A native dirty bitmap (bit ``p & 63`` of word ``p >> 6``) as one bool per page."""
    raw = np.ascontiguousarray(words, dtype="<u8").view(np.uint8)
    return np.unpackbits(raw, count=npages, bitorder="little").view(np.bool_)


def limits_of(params: Any) -> Limits:
    """The policy's view of ``downtime-limit``, ``max-bandwidth`` and
    ``avail-switchover-bandwidth`` (seconds, bytes/s) as they are now."""
    return Limits(downtime_limit=params.downtime_limit / 1000.0,
                  max_bandwidth=float(params.max_bandwidth),
                  switchover_bandwidth=float(params["avail-switchover-bandwidth"]))


class PolicyRunner:
    """One migration's policy, fed by the precopy thread."""

    def __init__(self, policy: Policy, blocks: Sequence["RamBlock"], limits: Limits,
                 link: LinkEstimate, postcopy_capable: bool = False) -> None:
        self.policy = policy
        self.name = policy_name(policy)
        self.blocks = list(blocks)
        firsts, regions, first = [], [], 0
        for b in self.blocks:
            regions.append(RamRegion(b.name, b.gpa, first, b.npages))
            firsts.append(first)
            first += b.npages
        self.firsts = np.array(firsts, dtype=np.int64)
        self._first_of = {b.name: f for b, f in zip(self.blocks, firsts)}
        self.npages = first
        self.setup = MigrationSetup(first, tuple(regions), link, limits, PAGE_SIZE)
        self.postcopy_capable = postcopy_capable
        self.history: list[RoundRecord] = []
        self.round = 0
        self.throttle_pct = 0
        self.started = time.monotonic()
        #: the live migration parameters, read again before every decision
        self.params: Any = None

    @classmethod
    def from_parameters(cls, text: str, blocks: Sequence["RamBlock"], params: Any,
                        postcopy_capable: bool = False) -> "PolicyRunner":
        """The policy ``text`` names (``""``: QEMU's), with the migration parameters'
        limits; loads it and calls its ``start``."""
        policy = load_policy(text or DEFAULT_POLICY)
        limits = limits_of(params)
        runner = cls(policy, blocks, limits, LinkEstimate(limits.max_bandwidth), postcopy_capable)
        runner.params = params
        call_start(policy, runner.setup)
        return runner

    def refresh_limits(self) -> None:
        """Tell the policy when ``migrate-set-parameters`` changed a limit mid-migration."""
        if self.params is None:
            return
        limits = limits_of(self.params)
        if limits != self.setup.limits:
            self.setup = replace(self.setup, limits=limits)
            call_limits_changed(self.policy, limits)

    # -- per round -------------------------------------------------------------------------------
    def mask_of(self, pages: Pages) -> np.ndarray:
        """``pages`` as one bool per page of the flat page space."""
        mask = np.zeros(self.npages, dtype=np.bool_)
        for block, idx in pages:
            mask[self._first_of[block.name] + idx] = True
        return mask

    def dirty_mask(self, words: Sequence[np.ndarray]) -> np.ndarray:
        """The bitmaps of the last sync (one word array per block) as a flat bool mask."""
        if not self.blocks:
            return np.zeros(0, dtype=np.bool_)
        return np.concatenate([words_to_mask(w, b.npages) for w, b in zip(words, self.blocks)])

    def decide(self, pending: Pages, dirty_words: Sequence[np.ndarray],
               bandwidth: float) -> Decision:
        """Ask the policy about the round about to start; a checked decision."""
        self.refresh_limits()
        unsent = self.mask_of(pending)
        dirty = self.dirty_mask(dirty_words)
        unsent.flags.writeable = dirty.flags.writeable = False
        state = RoundState(self.round, time.monotonic() - self.started, bandwidth, dirty,
                           unsent, tuple(self.history), self.throttle_pct, PAGE_SIZE)
        decision = call_decide(self.policy, state)
        if decision.postcopy and not self.postcopy_capable:
            raise PolicyError(f"migration policy '{self.name}' asked to switch to postcopy "
                              f"in round {self.round}, but the postcopy-ram capability is off")
        self._unsent = unsent
        return decision

    def plan(self, decision: Decision, pending: Pages) -> tuple[Pages, Pages]:
        """``(runs to send now, in order; pages left unsent)`` for a sending decision."""
        if decision.send is None:
            return list(pending), []
        send = decision.send
        runs: Pages = []
        if send.size:
            which = np.searchsorted(self.firsts, send, side="right") - 1
            cuts = np.flatnonzero(np.diff(which)) + 1
            for seg_idx, seg in zip(np.split(which, cuts), np.split(send, cuts)):
                b = int(seg_idx[0])
                runs.append((self.blocks[b], seg - self.firsts[b]))
        left = self._unsent.copy()
        left[send] = False
        rest: Pages = []
        for b, block in enumerate(self.blocks):
            first = int(self.firsts[b])
            idx = np.flatnonzero(left[first:first + block.npages])
            if idx.size:
                rest.append((block, idx))
        return runs, rest

    def end_round(self, started: float, duration: float, pages: int, nbytes: int,
                  dirty_words: Sequence[np.ndarray], unsent_after: int) -> None:
        """The round that began at ``started`` (monotonic) is over and synced."""
        dirtied = sum(int(np.count_nonzero(words_to_mask(w, b.npages)))
                      for w, b in zip(dirty_words, self.blocks))
        self.history.append(RoundRecord(self.round, started - self.started, duration, pages,
                                        nbytes, dirtied, unsent_after, self.throttle_pct))
        self.round += 1


__all__ = ["DEFAULT_POLICY", "PolicyRunner", "check_policy_text", "words_to_mask"]
