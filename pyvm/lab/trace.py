"""Dirty-page traces: what a guest wrote, sampled every ``interval`` seconds.

A trace holds ``samples`` bitmaps of ``npages`` bits; bit *p* of sample *i* is set when
the guest wrote page *p* during ``[i * interval, (i + 1) * interval)``.

Version 2 adds the vCPUs' busy fraction per sample (``busy``): the share of the
sample's wall time the vCPUs spent running guest code (``Machine.cpu_run_ns``), neither
halted nor waiting.  A throttle slows a guest only once it leaves less CPU than that
(:mod:`pyvm.lab.simulate`).

File format (version 2), all integers little-endian::

    magic      8 bytes  b"PYVMDTR\\n"
    version    u16      2 (1: no busy fractions)
    hlen       u32      length of the header, at most 1 MiB
    header     hlen bytes of UTF-8 JSON: format, version, guest, append, ram_bytes,
               page_size, npages, interval_s, samples, pyvm_version, compression,
               payload_bytes (compressed), busy (version 2: true when the payload
               holds busy fractions), plus free-form "notes"
    payload    a zstandard frame of samples * ceil(npages / 8) bytes: the bitmaps,
               row after row, each packed with numpy.packbits (bit order "big":
               page 8k is the top bit of byte k); then, when ``busy`` is true,
               samples little-endian float32: each sample's busy fraction

A reader reads versions 1 and 2; a version 1 trace has no busy fractions.

No pickle, no eval: a reader checks the magic, refuses a newer version by name, bounds
the header, and decompresses to exactly the size the header announces.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from pyvm import __version__
from pyvm.lab.errors import TraceError

MAGIC = b"PYVMDTR\n"
VERSION = 2
MAX_HEADER = 1 << 20
#: A trace's bitmaps may not decompress beyond this (4 GiB of bitmaps).
MAX_PAYLOAD = 4 << 30
_PREFIX = struct.Struct("<8sHI")


@dataclass
class Trace:
    """A dirty-page trace in memory: ``bitmaps`` is (samples, ceil(npages / 8)) uint8."""

    bitmaps: npt.NDArray[np.uint8]
    npages: int
    interval: float
    page_size: int = 4096
    guest: str = ""
    append: str = ""
    pyvm_version: str = __version__
    notes: dict[str, Any] = field(default_factory=dict)
    #: per sample, the share of its wall time the vCPUs ran (0..1; None: not recorded)
    busy: npt.NDArray[np.float32] | None = None

    def __post_init__(self) -> None:
        if self.bitmaps.ndim != 2 or self.bitmaps.dtype != np.uint8:
            raise TraceError("trace bitmaps must be a 2-D uint8 array")
        if self.bitmaps.shape[1] != (self.npages + 7) // 8:
            raise TraceError(f"trace rows hold {self.bitmaps.shape[1]} bytes, "
                             f"{(self.npages + 7) // 8} expected for {self.npages} pages")
        if not self.interval > 0:
            raise TraceError("trace interval must be positive")
        if self.busy is not None:
            self.busy = np.asarray(self.busy, dtype=np.float32)
            if self.busy.shape != (self.samples,):
                raise TraceError(f"trace holds {self.busy.shape} busy fractions for "
                                 f"{self.samples} samples")

    @classmethod
    def from_masks(cls, masks: npt.NDArray[np.bool_], interval: float, **meta: Any) -> "Trace":
        """A trace from a (samples, npages) boolean array."""
        masks = np.asarray(masks, dtype=np.bool_)
        return cls(np.packbits(masks, axis=1), masks.shape[1], interval, **meta)

    @property
    def samples(self) -> int:
        return int(self.bitmaps.shape[0])

    @property
    def duration(self) -> float:
        return self.samples * self.interval

    @property
    def ram_bytes(self) -> int:
        return self.npages * self.page_size

    def mean_busy(self) -> float | None:
        """The vCPUs' mean busy fraction over the samples that have one (None: none)."""
        if self.busy is None:
            return None
        known = self.busy[np.isfinite(self.busy)]
        return float(known.astype(np.float64).mean()) if known.size else None

    def mask(self, i: int) -> npt.NDArray[np.bool_]:
        """Sample ``i`` as one bool per page."""
        return np.unpackbits(self.bitmaps[i], count=self.npages).view(np.bool_)

    def counts(self) -> npt.NDArray[np.int64]:
        """Pages written in each sample (the writable working set per interval)."""
        table = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).sum(axis=1)
        out: npt.NDArray[np.int64] = table[self.bitmaps].sum(axis=1).astype(np.int64)
        return out

    def header(self, payload_bytes: int) -> dict[str, Any]:
        return {
            "format": "pyvm-dirty-trace", "version": VERSION, "guest": self.guest,
            "append": self.append, "ram_bytes": self.ram_bytes, "page_size": self.page_size,
            "npages": self.npages, "interval_s": self.interval, "samples": self.samples,
            "pyvm_version": self.pyvm_version, "compression": "zstd",
            "payload_bytes": payload_bytes, "busy": self.busy is not None,
            "notes": self.notes,
        }


def dumps(trace: Trace, level: int = 9) -> bytes:
    """The file bytes of ``trace``."""
    import zstandard        # deferred: only reading or writing a trace needs it

    raw = np.ascontiguousarray(trace.bitmaps).tobytes()
    if trace.busy is not None:
        raw += trace.busy.astype("<f4").tobytes()
    payload = zstandard.ZstdCompressor(level=level).compress(raw)
    header = json.dumps(trace.header(len(payload)), sort_keys=True).encode()
    return _PREFIX.pack(MAGIC, VERSION, len(header)) + header + payload


def save(trace: Trace, path: str) -> int:
    """Write ``trace`` to ``path``; returns the file size."""
    data = dumps(trace)
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def _need(header: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = header.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TraceError(f"{where}: header field '{key}' is missing or not a {kind.__name__}")
    return value


def loads(data: bytes, where: str = "trace") -> Trace:
    """Parse a trace file's bytes (:class:`TraceError` on anything unexpected)."""
    if len(data) < _PREFIX.size:
        raise TraceError(f"{where}: not a pyvm dirty-page trace (file too short)")
    magic, version, hlen = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise TraceError(f"{where}: not a pyvm dirty-page trace (bad magic)")
    if version > VERSION:
        raise TraceError(f"{where}: trace format version {version} is newer than this pyvm "
                         f"({__version__}) reads (version {VERSION}); upgrade pyvm to read it")
    if version < 1:
        raise TraceError(f"{where}: unknown trace format version {version}")
    if hlen > MAX_HEADER or _PREFIX.size + hlen > len(data):
        raise TraceError(f"{where}: trace header length {hlen} is out of bounds")
    try:
        header = json.loads(data[_PREFIX.size:_PREFIX.size + hlen].decode())
    except (UnicodeDecodeError, ValueError) as err:
        raise TraceError(f"{where}: trace header is not JSON: {err}") from err
    if not isinstance(header, dict):
        raise TraceError(f"{where}: trace header is not a JSON object")
    npages = _need(header, "npages", int, where)
    samples = _need(header, "samples", int, where)
    interval = header.get("interval_s")
    if not isinstance(interval, (int, float)) or isinstance(interval, bool) or interval <= 0:
        raise TraceError(f"{where}: header field 'interval_s' must be a positive number")
    if header.get("compression") != "zstd":
        raise TraceError(f"{where}: unknown compression {header.get('compression')!r}")
    if npages < 0 or samples < 0:
        raise TraceError(f"{where}: negative npages or samples")
    has_busy = version >= 2 and header.get("busy") is True
    bitmap_size = samples * ((npages + 7) // 8)
    size = bitmap_size + (4 * samples if has_busy else 0)
    if size > MAX_PAYLOAD:
        raise TraceError(f"{where}: {size} bytes of bitmaps exceed the {MAX_PAYLOAD} limit")
    import zstandard        # deferred: only reading or writing a trace needs it

    payload = data[_PREFIX.size + hlen:]
    try:
        raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=size) \
            if size else b""
    except zstandard.ZstdError as err:
        raise TraceError(f"{where}: trace payload does not decompress: {err}") from err
    if len(raw) != size:
        raise TraceError(f"{where}: trace payload holds {len(raw)} bytes, {size} expected")
    notes = header.get("notes", {})
    bitmaps = np.frombuffer(raw, dtype=np.uint8, count=bitmap_size).reshape(
        samples, (npages + 7) // 8).copy()
    busy = np.frombuffer(raw, dtype="<f4", offset=bitmap_size).astype(np.float32) \
        if has_busy else None
    return Trace(bitmaps, npages, float(interval), busy=busy,
                 page_size=_need(header, "page_size", int, where),
                 guest=str(header.get("guest", "")), append=str(header.get("append", "")),
                 pyvm_version=str(header.get("pyvm_version", "")),
                 notes=notes if isinstance(notes, dict) else {})


def load(path: str) -> Trace:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as err:
        raise TraceError(f"cannot read trace '{path}': {err.strerror}") from err
    return loads(data, path)
