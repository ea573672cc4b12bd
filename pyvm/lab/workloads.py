"""Synthetic dirty-page traces with known, tunable patterns.

Patterns like those the ``dirty.elf`` guest writes on a real VM (``firmware/dirty.s``;
its hot/cold pattern is two-level, where ``zipf`` here is a smooth skew), generated
directly with numpy so that the simulator, tests and sweeps need no VM.  A workload is
written ``NAME[:key=value,...]``:

==========  ==================================================================
``idle``    nothing is written
``uniform`` ``rate`` page writes per second, uniformly over the range
``zipf``    ``rate`` writes per second; page of rank r is chosen with weight
            1 / r ** ``s`` (ranks scattered over the range by a seeded shuffle)
``sweep``   ``rate`` pages per second in ascending order, wrapping around
``phases``  ``uniform`` at ``rate`` for ``busy`` seconds, then idle for ``quiet``
==========  ==================================================================

Common keys: ``ram`` (bytes, ``64M``: the range written, default 64 MiB), ``seconds``
(trace length, default 10), ``interval`` (sample period, ``50ms``), ``seed`` (default 1).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import numpy.typing as npt

from pyvm.lab.errors import WorkloadError
from pyvm.lab.link import parse_time
from pyvm.lab.trace import Trace

PAGE = 4096
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    """Bytes from ``64M``, ``1G``, ``4096``."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in "KMG" else ""
    try:
        return int(float(t[:len(t) - len(unit)]) * _SIZE_UNITS[unit])
    except ValueError:
        raise WorkloadError(f"size '{text}': expected a number with K, M or G") from None


Masks = npt.NDArray[np.bool_]


def _writes(rng: np.random.Generator, samples: int, per_sample: int, npages: int,
            weights: npt.NDArray[np.float64] | None = None) -> Masks:
    masks = np.zeros((samples, npages), dtype=np.bool_)
    if per_sample <= 0 or npages == 0:
        return masks
    if weights is None:
        idx = rng.integers(0, npages, size=(samples, per_sample))
    else:
        cdf = np.cumsum(weights)
        idx = np.searchsorted(cdf, rng.random((samples, per_sample)) * cdf[-1], side="right")
        idx = np.minimum(idx, npages - 1)
    np.put_along_axis(masks, idx, True, axis=1)
    return masks


def _idle(rng: np.random.Generator, samples: int, npages: int, per: float,
          p: dict[str, float]) -> Masks:
    return np.zeros((samples, npages), dtype=np.bool_)


def _uniform(rng: np.random.Generator, samples: int, npages: int, per: float,
             p: dict[str, float]) -> Masks:
    return _writes(rng, samples, round(p["rate"] * per), npages)


def _zipf(rng: np.random.Generator, samples: int, npages: int, per: float,
          p: dict[str, float]) -> Masks:
    weights = 1.0 / np.arange(1, npages + 1, dtype=np.float64) ** p["s"]
    ranks = _writes(rng, samples, round(p["rate"] * per), npages, weights)
    return ranks[:, rng.permutation(npages)]


def _sweep(rng: np.random.Generator, samples: int, npages: int, per: float,
           p: dict[str, float]) -> Masks:
    masks = np.zeros((samples, npages), dtype=np.bool_)
    step = p["rate"] * per
    for i in range(samples):
        a, b = int(i * step), int((i + 1) * step)
        if b > a:
            pages = np.arange(a, b) % npages
            masks[i, pages] = True
    return masks


def _phases(rng: np.random.Generator, samples: int, npages: int, per: float,
            p: dict[str, float]) -> Masks:
    masks = _uniform(rng, samples, npages, per, p)
    period = p["busy"] + p["quiet"]
    t = (np.arange(samples) + 0.5) * per
    masks[(t % period) >= p["busy"]] = False
    return masks


_Gen = Callable[[np.random.Generator, int, int, float, dict[str, float]], Masks]
WORKLOADS: dict[str, tuple[_Gen, dict[str, float]]] = {
    "idle": (_idle, {}),
    "uniform": (_uniform, {"rate": 20000.0}),
    "zipf": (_zipf, {"rate": 50000.0, "s": 1.1}),
    "sweep": (_sweep, {"rate": 20000.0}),
    "phases": (_phases, {"rate": 40000.0, "busy": 1.0, "quiet": 1.0}),
}


def synthesize(spec: str) -> Trace:
    """The trace ``spec`` (``NAME[:key=value,...]``, see the module docstring) describes."""
    name, _, rest = spec.partition(":")
    if name not in WORKLOADS:
        raise WorkloadError(f"unknown workload '{name}'; known: {', '.join(WORKLOADS)}")
    gen, defaults = WORKLOADS[name]
    params = dict(defaults)
    ram, seconds, interval, seed = 64 << 20, 10.0, 0.05, 1
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise WorkloadError(f"workload '{spec}': '{item}' is not key=value")
        try:
            if key == "ram":
                ram = parse_size(value)
            elif key == "seconds":
                seconds = float(value)
            elif key == "interval":
                interval = parse_time(value)
            elif key == "seed":
                seed = int(value)
            elif key in params:
                params[key] = float(value)
            else:
                raise WorkloadError(f"workload '{name}' has no parameter '{key}'; it takes "
                                    f"{', '.join(['ram', 'seconds', 'interval', 'seed', *params])}")
        except ValueError:
            raise WorkloadError(f"workload '{spec}': bad value for '{key}'") from None
    npages = ram // PAGE
    samples = int(round(seconds / interval))
    if npages <= 0 or samples <= 0 or interval <= 0:
        raise WorkloadError(f"workload '{spec}': ram, seconds and interval must be positive")
    masks = gen(np.random.default_rng(seed), samples, npages, interval, params)
    return Trace.from_masks(masks, interval, guest=f"synthetic {spec}",
                            notes={"workload": name, "params": params, "seed": seed})
