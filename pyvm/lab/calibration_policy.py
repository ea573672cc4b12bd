"""The policies of ``pyvm-lab validate``'s calibration migrations (:mod:`pyvm.lab.validate`).

:class:`Calibrate`: QEMU's rounds (every dirty page, in address order) for a fixed
number of rounds, then stop-and-copy whatever is left: a calibration must end whatever
the guest writes and the limits are (QEMU's own rule never ends on a guest that
outruns the link), and gives a few rounds to time.

:class:`CalibrateHold`: the same rounds, but the pages the guest wrote during round 0
are held back for the final copy, which is then several MB larger: next to
:class:`Calibrate`'s small final copies, the downtime of these gives the final copy's
rate and the switchover's fixed cost apart.

The engine loads them by name in the source process
(``x-policy pyvm.lab.calibration_policy:Calibrate``).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from pyvm.migration.policy import Decision, Policy, RoundState

ROUNDS = 3


class Calibrate(Policy):
    name = "calibrate"

    def decide(self, state: RoundState) -> Decision:
        return Decision.stop() if state.round >= ROUNDS else Decision()


class CalibrateHold(Policy):
    name = "calibrate-hold"
    held: npt.NDArray[np.bool_] | None = None

    def decide(self, state: RoundState) -> Decision:
        if state.round >= ROUNDS:
            return Decision.stop()
        if state.round == 1:
            self.held = np.array(state.dirty, dtype=np.bool_, copy=True)
        if self.held is None:
            return Decision()
        return Decision(send=np.flatnonzero(state.unsent & ~self.held))


SPEC = "pyvm.lab.calibration_policy:Calibrate"
HOLD_SPEC = "pyvm.lab.calibration_policy:CalibrateHold"
