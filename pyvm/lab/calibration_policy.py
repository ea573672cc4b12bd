"""The policies of ``pyvm-lab validate``'s calibration migrations (:mod:`pyvm.lab.validate`).

:class:`Calibrate`: QEMU's rounds (every dirty page, in address order) for a fixed
number of rounds, then stop-and-copy whatever is left: a calibration must end whatever
the guest writes and the limits are (QEMU's own rule never ends on a guest that
outruns the link), and gives a few rounds to time.

:class:`CalibrateHold`: round 0, then rounds that send nothing for ``HOLD_S`` seconds,
then stop-and-copy: everything the guest wrote since round 0 goes in the final copy,
several MB more than :class:`Calibrate`'s.  Next to those, the downtimes of these tell
the final copy's rate from the switchover's fixed cost.

The engine loads them by name in the source process
(``x-policy pyvm.lab.calibration_policy:Calibrate``).
"""

from __future__ import annotations

import numpy as np

from pyvm.migration.policy import Decision, Policy, RoundState

ROUNDS = 3
#: seconds CalibrateHold lets the guest write after round 0
HOLD_S = 1.0


class Calibrate(Policy):
    name = "calibrate"

    def decide(self, state: RoundState) -> Decision:
        return Decision.stop() if state.round >= ROUNDS else Decision()


class CalibrateHold(Policy):
    name = "calibrate-hold"
    since = 0.0

    def decide(self, state: RoundState) -> Decision:
        if state.round == 0:
            return Decision()
        if state.round == 1:
            self.since = state.elapsed
        if state.elapsed - self.since >= HOLD_S:
            return Decision.stop()
        return Decision(send=np.zeros(0, dtype=np.int64))


SPEC = "pyvm.lab.calibration_policy:Calibrate"
HOLD_SPEC = "pyvm.lab.calibration_policy:CalibrateHold"
