"""The policy of ``pyvm-lab validate``'s calibration migrations (:mod:`pyvm.lab.validate`).

QEMU's rounds (every dirty page, in address order) for a fixed number of rounds, then
stop-and-copy whatever is left: a calibration must end whatever the guest writes and
the limits are (QEMU's own rule never ends on a guest that outruns the link), and
gives a few rounds to time.  The engine loads it by name in the source process
(``x-policy pyvm.lab.calibration_policy:Calibrate``).
"""

from __future__ import annotations

from pyvm.migration.policy import Decision, Policy, RoundState

ROUNDS = 3


class Calibrate(Policy):
    name = "calibrate"

    def decide(self, state: RoundState) -> Decision:
        return Decision.stop() if state.round >= ROUNDS else Decision()


SPEC = "pyvm.lab.calibration_policy:Calibrate"
