"""Migration policies: a precopy algorithm as a small Python class.

A *policy* decides, once per round, what a precopy migration does next.  Whoever runs
the migration (the precopy engine, :mod:`pyvm.migration.control.policy_runner`, chosen
by the migration parameter ``x-policy``; or the lab's simulator) calls it:

1. :meth:`Policy.start` once, with a :class:`MigrationSetup` (RAM layout, link estimate,
   limits);
2. :meth:`Policy.decide` at every dirty-bitmap sync, with a :class:`RoundState` (round
   number, elapsed time, measured bandwidth, the pages dirtied since the last sync, the
   pages still unsent, the history of earlier rounds), and gets back a
   :class:`Decision`.

Decisions are whole arrays (a page-index array in sending order), so moving pages stays
native and Python runs once per round, never once per page.

The round protocol
------------------
Round 0 starts with every page unsent (``dirty`` is all ones, as after QEMU's
``ram_save_setup`` marks the whole bitmap).  At round *k* the runner:

* asks ``decide(state)``;
* if ``stop_and_copy``: stops the vCPUs, syncs once more, sends every unsent page and
  the device state (the downtime), and ends;
* if ``postcopy``: stops the vCPUs, sends the device state, resumes the guest on the
  destination and pushes every unsent page from there on (the downtime is only the
  switchover);
* otherwise: sets the vCPU throttle to ``throttle_pct``, sends ``send`` (a subset of the
  unsent pages, in that order; ``None`` means every unsent page in address order), syncs
  the dirty bitmap and ORs what the guest dirtied meanwhile into the unsent set.

Pages a policy leaves out of ``send`` simply stay unsent.  A policy that raises, or
answers anything but a valid :class:`Decision`, ends the migration with a
:class:`PolicyError` whose message starts with the policy's name.

Policies are loaded by :func:`load_policy` from a short name (``qemu``, ``xen-skip``,
``auto-converge``, ``hybrid-postcopy``, ``hot-cold``), from ``module:Class`` or from
``path/to/file.py:Class``.

This module depends on numpy only, so the engine, the simulator and a Dask worker all
import it cheaply, and nothing in it reaches up into the rest of pyvm.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt

PAGE_SIZE = 4096
#: Bytes on the wire for one normal page in QEMU's stream: the be64 address|flags word,
#: then the page (``migration/ram.c``: save_page_header + the page).
PAGE_WIRE_BYTES = PAGE_SIZE + 8
#: QEMU's ``max-cpu-throttle`` upper bound (``migration/options.c``).
MAX_THROTTLE_PCT = 99

BoolArray = npt.NDArray[np.bool_]
IndexArray = npt.NDArray[np.int64]


class PolicyError(Exception):
    """A policy raised or answered nonsense; the message names the policy."""


@dataclass(frozen=True)
class RamRegion:
    """One RAM block as the policy sees it: pages ``first .. first + npages - 1`` of the
    flat page space the bitmaps use, guest physical address ``gpa``."""

    name: str
    gpa: int
    first: int
    npages: int


@dataclass(frozen=True)
class LinkEstimate:
    """What the runner knows of the link before sending: bytes/s and round-trip seconds."""

    bandwidth: float
    rtt: float = 0.0


@dataclass(frozen=True)
class Limits:
    """QEMU's knobs: ``downtime-limit`` (here in seconds), ``max-bandwidth`` (bytes/s, 0 =
    none), ``avail-switchover-bandwidth`` (bytes/s, 0 = use the measured rate)."""

    downtime_limit: float = 0.3
    max_bandwidth: float = 0.0
    switchover_bandwidth: float = 0.0


@dataclass(frozen=True)
class MigrationSetup:
    """Told to :meth:`Policy.start`."""

    npages: int
    regions: tuple[RamRegion, ...]
    link: LinkEstimate
    limits: Limits
    page_size: int = PAGE_SIZE

    @property
    def ram_bytes(self) -> int:
        return self.npages * self.page_size


@dataclass(frozen=True)
class RoundRecord:
    """One finished round, kept in :attr:`RoundState.history`."""

    round: int
    start: float           # seconds since the migration started
    duration: float        # seconds
    pages_sent: int
    bytes_sent: int
    dirtied: int           # pages dirtied during the round (the next sync's count)
    unsent_after: int      # pages unsent after that sync
    throttle_pct: int


@dataclass(frozen=True)
class RoundState:
    """Told to :meth:`Policy.decide` at every sync.  The arrays are the runner's own
    buffers: read them, never keep or modify them (copy what you want to remember)."""

    round: int
    elapsed: float         # seconds since the migration started
    bandwidth: float       # bytes/s measured over the last round (round 0: the estimate)
    dirty: BoolArray       # pages dirtied since the last sync (round 0: all)
    unsent: BoolArray      # pages whose current content the destination lacks
    history: tuple[RoundRecord, ...]
    throttle_pct: int      # the throttle in force
    page_size: int = PAGE_SIZE

    @property
    def unsent_bytes(self) -> int:
        return int(np.count_nonzero(self.unsent)) * self.page_size


@dataclass(frozen=True)
class Decision:
    """The answer for one round.  ``send``: page indices in sending order, a subset of the
    unsent pages without repeats (``None``: all unsent, address order).  ``throttle_pct``:
    0..99, the share of vCPU time taken away (QEMU's cpu-throttle percentage)."""

    send: IndexArray | None = None
    stop_and_copy: bool = False
    postcopy: bool = False
    throttle_pct: int = 0

    @classmethod
    def stop(cls, throttle_pct: int = 0) -> "Decision":
        return cls(stop_and_copy=True, throttle_pct=throttle_pct)

    @classmethod
    def switch_to_postcopy(cls, throttle_pct: int = 0) -> "Decision":
        return cls(postcopy=True, throttle_pct=throttle_pct)


class Policy:
    """Base class of migration policies.  Subclasses override :meth:`decide` (and
    :meth:`start` to size their state); ``name`` appears in every error about them."""

    name: str = "policy"

    def start(self, setup: MigrationSetup) -> None:
        """The migration begins; ``setup`` stays valid until it ends (but see
        :meth:`limits_changed`)."""
        self.setup = setup

    def limits_changed(self, limits: Limits) -> None:
        """``migrate-set-parameters`` changed ``downtime-limit``, ``max-bandwidth`` or
        ``avail-switchover-bandwidth`` during the migration (QEMU applies them at once);
        called before the next :meth:`decide`.  The default keeps ``self.setup`` current."""
        self.setup = replace(self.setup, limits=limits)

    def decide(self, state: RoundState) -> Decision:
        raise NotImplementedError


def switchover_bandwidth(setup: MigrationSetup, state: RoundState) -> float:
    """The rate QEMU assumes for the final copy: ``avail-switchover-bandwidth`` when set,
    else the bandwidth measured over the last round (``migration/migration.c``,
    migration_update_counters)."""
    return setup.limits.switchover_bandwidth or state.bandwidth


def qemu_converged(setup: MigrationSetup, state: RoundState) -> bool:
    """QEMU's switchover rule: the pending bytes fit in ``bandwidth * downtime-limit``
    (``migration/migration.c``: migration_update_counters sets threshold_size =
    expected_bw_per_ms * downtime_limit; migration_iteration_run completes when
    pending_size < threshold_size).  pyvm's precopy has always compared with ``<=``, and
    so does this rule, so that the default policy keeps today's streams."""
    threshold = switchover_bandwidth(setup, state) * setup.limits.downtime_limit
    return state.unsent_bytes <= threshold


class QemuPrecopy(Policy):
    """QEMU's precopy: send every dirty page in address order each round; stop and copy
    once the remaining bytes would go out within ``downtime-limit`` at the measured
    bandwidth.  Round 0 always sends everything (QEMU iterates before its first check)."""

    name = "qemu"

    def decide(self, state: RoundState) -> Decision:
        if state.round > 0 and qemu_converged(self.setup, state):
            return Decision.stop()
        return Decision()


# -- checking answers ---------------------------------------------------------------------------

def check_decision(name: str, answer: object, state: RoundState) -> Decision:
    """``answer`` if it is a valid decision for ``state``, else :class:`PolicyError`.

    A valid ``send`` is a 1-D integer array of unsent pages without repeats; indices
    are returned as int64 in the order given.
    """
    if not isinstance(answer, Decision):
        raise PolicyError(f"migration policy '{name}' returned {type(answer).__name__}, "
                          "not a Decision")
    tp = answer.throttle_pct
    if isinstance(tp, bool) or not isinstance(tp, (int, np.integer)) \
            or not 0 <= int(tp) <= MAX_THROTTLE_PCT:
        raise PolicyError(f"migration policy '{name}' asked for throttle {tp!r}; "
                          f"it must be an integer from 0 to {MAX_THROTTLE_PCT}")
    if answer.stop_and_copy and answer.postcopy:
        raise PolicyError(f"migration policy '{name}' asked for stop-and-copy and postcopy "
                          "at once")
    send = answer.send
    if send is None or answer.stop_and_copy or answer.postcopy:
        return Decision(None, bool(answer.stop_and_copy), bool(answer.postcopy), int(tp))
    arr = np.asarray(send)
    if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
        raise PolicyError(f"migration policy '{name}' returned pages to send as a "
                          f"{arr.ndim}-D {arr.dtype} array; it must be a 1-D integer array")
    idx = arr.astype(np.int64, copy=False)
    n = state.unsent.size
    if idx.size:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= n:
            raise PolicyError(f"migration policy '{name}' asked to send page "
                              f"{lo if lo < 0 else hi}, outside 0..{n - 1}")
        seen = np.zeros(n, dtype=np.bool_)
        seen[idx] = True
        if int(np.count_nonzero(seen)) != idx.size:
            raise PolicyError(f"migration policy '{name}' listed a page twice in one round")
        stale = seen & ~state.unsent
        if stale.any():
            raise PolicyError(f"migration policy '{name}' asked to send page "
                              f"{int(np.flatnonzero(stale)[0])}, which is not unsent")
    return Decision(idx, False, False, int(tp))


def call_start(policy: Policy, setup: MigrationSetup) -> None:
    """``policy.start(setup)``; any exception becomes a :class:`PolicyError`."""
    try:
        policy.start(setup)
    except Exception as err:  # noqa: BLE001 - a policy bug ends the migration, not the VM
        raise PolicyError(f"migration policy '{policy_name(policy)}' failed at start: "
                          f"{type(err).__name__}: {err}") from err


def call_limits_changed(policy: Policy, limits: Limits) -> None:
    """``policy.limits_changed(limits)``; any exception becomes a :class:`PolicyError`."""
    try:
        policy.limits_changed(limits)
    except Exception as err:  # noqa: BLE001 - a policy bug ends the migration, not the VM
        raise PolicyError(f"migration policy '{policy_name(policy)}' failed on new limits: "
                          f"{type(err).__name__}: {err}") from err


def call_decide(policy: Policy, state: RoundState) -> Decision:
    """``policy.decide(state)`` checked by :func:`check_decision`; exceptions become
    :class:`PolicyError` naming the policy and the round."""
    name = policy_name(policy)
    try:
        answer = policy.decide(state)
    except Exception as err:  # noqa: BLE001
        raise PolicyError(f"migration policy '{name}' failed in round {state.round}: "
                          f"{type(err).__name__}: {err}") from err
    return check_decision(name, answer, state)


def policy_name(policy: object) -> str:
    name = getattr(policy, "name", None)
    return name if isinstance(name, str) and name else type(policy).__name__


# -- loading ------------------------------------------------------------------------------------

#: Short names of the shipped policies (loaded lazily, so this module imports no lab code).
BUILTIN_POLICIES: dict[str, str] = {
    "qemu": "pyvm.migration.policy:QemuPrecopy",
    "xen-skip": "pyvm.lab.policies.xen_skip:XenSkip",
    "auto-converge": "pyvm.lab.policies.auto_converge:AutoConverge",
    "hybrid-postcopy": "pyvm.lab.policies.hybrid_postcopy:HybridPostcopy",
    "hot-cold": "pyvm.lab.policies.hot_cold:HotCold",
}


@dataclass
class PolicySpec:
    """A parsed policy reference: where the class lives."""

    text: str
    module: str = ""
    file: str = ""
    attr: str = ""


def parse_policy(text: str) -> PolicySpec:
    """``qemu`` | ``module.path:Class`` | ``file.py:Class`` → :class:`PolicySpec`."""
    spec = PolicySpec(text)
    target = BUILTIN_POLICIES.get(text, text)
    where, sep, attr = target.rpartition(":")
    if not sep or not where or not attr.isidentifier():
        raise PolicyError(f"migration policy '{text}': expected a name "
                          f"({', '.join(BUILTIN_POLICIES)}), module:Class or file.py:Class")
    spec.attr = attr
    if where.endswith(".py") or os.sep in where:
        spec.file = where
    else:
        spec.module = where
    return spec


def load_policy(text: str) -> Policy:
    """A fresh instance of the policy ``text`` names (see :func:`parse_policy`)."""
    spec = parse_policy(text)
    try:
        if spec.file:
            if not os.path.isfile(spec.file):
                raise PolicyError(f"migration policy '{text}': no file {spec.file}")
            mod_name = "pyvm_policy_" + os.path.splitext(os.path.basename(spec.file))[0]
            loader_spec = importlib.util.spec_from_file_location(mod_name, spec.file)
            if loader_spec is None or loader_spec.loader is None:
                raise PolicyError(f"migration policy '{text}': cannot load {spec.file}")
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(spec.module)
        cls = getattr(module, spec.attr)
        policy = cls()
    except PolicyError:
        raise
    except Exception as err:  # noqa: BLE001 - import errors, missing names, bad __init__
        raise PolicyError(f"migration policy '{text}' cannot be loaded: "
                          f"{type(err).__name__}: {err}") from err
    if not callable(getattr(policy, "decide", None)) or not callable(getattr(policy, "start", None)):
        raise PolicyError(f"migration policy '{text}': {spec.attr} has no start() and decide()")
    if not isinstance(getattr(policy, "name", None), str) or policy.name == Policy.name:
        policy.name = text
    return policy  # type: ignore[no-any-return]
