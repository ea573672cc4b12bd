"""Link models for the simulator: a rate, a round-trip time, and loss and jitter taken as
penalties on the rate.

Text form (command line, sweep grids): ``RATE[,rtt=TIME][,loss=FRACTION][,jitter=TIME]``,
e.g. ``1Gbit,rtt=20ms,loss=0.001``.  RATE: ``Kbit``/``Mbit``/``Gbit`` (decimal bits per
second, as ``tc`` writes them), ``KB``/``MB``/``GB`` (decimal bytes per second) or
``KiB``/``MiB``/``GiB`` (binary bytes per second); TIME: ``s``, ``ms`` or ``us``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pyvm.lab.errors import LabError

_RATE_UNITS = {
    "bit": 1 / 8, "kbit": 1e3 / 8, "mbit": 1e6 / 8, "gbit": 1e9 / 8,
    "b": 1.0, "kb": 1e3, "mb": 1e6, "gb": 1e9,
    "kib": 1024.0, "mib": float(1 << 20), "gib": float(1 << 30),
}
_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
_NUMBER = r"([0-9]+(?:\.[0-9]*)?(?:e-?[0-9]+)?)"


def parse_rate(text: str) -> float:
    """Bytes per second from ``100Mbit``, ``1GiB``, ``125MB``..."""
    m = re.fullmatch(_NUMBER + r"\s*([a-zA-Z]+)(?:/s)?", text.strip())
    if not m or m.group(2).lower() not in _RATE_UNITS:
        raise LabError(f"link rate '{text}': expected a number and one of "
                       "Kbit, Mbit, Gbit, KB, MB, GB, KiB, MiB, GiB")
    rate = float(m.group(1)) * _RATE_UNITS[m.group(2).lower()]
    if rate <= 0:
        raise LabError(f"link rate '{text}' must be positive")
    return rate


def parse_time(text: str) -> float:
    """Seconds from ``20ms``, ``1.5s``, ``300us``."""
    m = re.fullmatch(_NUMBER + r"\s*(s|ms|us)", text.strip())
    if not m:
        raise LabError(f"time '{text}': expected a number and s, ms or us")
    return float(m.group(1)) * _TIME_UNITS[m.group(2)]


@dataclass(frozen=True)
class LinkModel:
    """A link: ``bandwidth`` bytes/s, ``rtt`` seconds; ``loss`` (a fraction of packets)
    scales the rate by ``1 - loss`` and ``jitter`` (seconds) by ``rtt / (rtt + jitter)``
    (a crude penalty for a TCP stream's window recovering, not a queueing model)."""

    bandwidth: float
    rtt: float = 0.0
    loss: float = 0.0
    jitter: float = 0.0
    name: str = ""

    def __post_init__(self) -> None:
        if not self.bandwidth > 0:
            raise LabError("link bandwidth must be positive")
        if self.rtt < 0 or self.jitter < 0:
            raise LabError("link rtt and jitter cannot be negative")
        if not 0 <= self.loss < 1:
            raise LabError("link loss must be a fraction from 0 up to (not including) 1")

    @property
    def effective(self) -> float:
        """The rate a migration stream gets, bytes/s."""
        rate = self.bandwidth * (1.0 - self.loss)
        if self.jitter:
            rate *= self.rtt / (self.rtt + self.jitter) if self.rtt else 0.5
        return rate

    @property
    def label(self) -> str:
        return self.name or describe_rate(self.bandwidth) + (
            f" rtt {self.rtt * 1e3:g}ms" if self.rtt else "")

    @classmethod
    def parse(cls, text: str) -> "LinkModel":
        """``RATE[,rtt=TIME][,loss=F][,jitter=TIME]`` (see the module docstring)."""
        parts = [p.strip() for p in text.split(",")]
        rate = parse_rate(parts[0])
        opts: dict[str, float] = {}
        for part in parts[1:]:
            key, sep, value = part.partition("=")
            if not sep or key not in ("rtt", "loss", "jitter") or key in opts:
                raise LabError(f"link '{text}': expected rtt=, loss= or jitter= after the "
                               f"rate, got '{part}'")
            if key == "loss":
                try:
                    opts[key] = float(value)
                except ValueError:
                    raise LabError(f"link '{text}': loss '{value}' is not a number") from None
            else:
                opts[key] = parse_time(value)
        return cls(rate, opts.get("rtt", 0.0), opts.get("loss", 0.0), opts.get("jitter", 0.0),
                   name=text)


def describe_rate(rate: float) -> str:
    """``1Gbit``, ``100Mbit``... for a rate in bytes/s."""
    bits = rate * 8
    for unit, scale in (("Gbit", 1e9), ("Mbit", 1e6), ("Kbit", 1e3)):
        if bits >= scale:
            return f"{bits / scale:g}{unit}"
    return f"{bits:g}bit"
