"""The trace file: round trip, compression, and refusal of anything unexpected."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from pyvm.lab import trace as tracefmt
from pyvm.lab.errors import TraceError, WorkloadError
from pyvm.lab.info import summary, wws_series
from pyvm.lab.trace import Trace, dumps, load, loads, save
from pyvm.lab.workloads import synthesize


def sample() -> Trace:
    rng = np.random.default_rng(3)
    return Trace.from_masks(rng.random((40, 1001)) < 0.02, 0.05, guest="g", append="a=1",
                            notes={"k": 1})


def test_round_trip(tmp_path: Path) -> None:
    tr = sample()
    path = str(tmp_path / "t.trace")
    size = save(tr, path)
    back = load(path)
    assert (back.bitmaps == tr.bitmaps).all()
    assert (back.npages, back.interval, back.guest, back.append, back.notes) == \
        (1001, 0.05, "g", "a=1", {"k": 1})
    assert back.mask(3).tolist() == tr.mask(3).tolist()
    assert size < tr.bitmaps.nbytes            # compressed


def test_file_starts_with_magic_version_and_json_header() -> None:
    data = dumps(sample())
    magic, version, hlen = struct.unpack_from("<8sHI", data)
    assert magic == b"PYVMDTR\n" and version == 2
    header = json.loads(data[14:14 + hlen])
    assert header["format"] == "pyvm-dirty-trace" and header["npages"] == 1001
    assert header["samples"] == 40 and header["ram_bytes"] == 1001 * 4096
    assert header["payload_bytes"] == len(data) - 14 - hlen
    assert b"pickle" not in data


def _with_header(data: bytes, **changes: object) -> bytes:
    _, version, hlen = struct.unpack_from("<8sHI", data)
    header = json.loads(data[14:14 + hlen])
    header.update(changes)
    h = json.dumps(header).encode()
    return struct.pack("<8sHI", tracefmt.MAGIC, version, len(h)) + h + data[14 + hlen:]


def test_refuses_newer_versions_by_name() -> None:
    data = bytearray(dumps(sample()))
    struct.pack_into("<H", data, 8, 3)
    with pytest.raises(TraceError, match=r"trace format version 3 is newer than this pyvm .* "
                                         r"reads \(version 2\); upgrade pyvm"):
        loads(bytes(data), "x.trace")


@pytest.mark.parametrize("mangle, words", [
    (lambda d: b"NOTATRACE" + d[9:], "bad magic"),
    (lambda d: d[:5], "too short"),
    (lambda d: d[:-10], "does not decompress"),
    (lambda d: d[:8] + struct.pack("<HI", 1, 1 << 30) + d[14:], "header length"),
    (lambda d: _with_header(d, samples=41), "payload"),
    (lambda d: _with_header(d, npages="many"), "'npages' is missing or not a int"),
    (lambda d: _with_header(d, interval_s=0), "interval_s"),
    (lambda d: _with_header(d, compression="lz4"), "unknown compression"),
    (lambda d: _with_header(d, samples=1 << 40), "exceed"),
])
def test_refuses_malformed_files(mangle, words: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TraceError, match=words):
        loads(mangle(dumps(sample())))


def test_busy_fractions_round_trip_after_the_bitmaps(tmp_path: Path) -> None:
    busy = np.linspace(0.0, 1.0, 40, dtype=np.float32)
    busy[7] = np.nan                               # a sample without a reading
    tr = Trace(sample().bitmaps, 1001, 0.05, busy=busy)
    path = str(tmp_path / "b.trace")
    save(tr, path)
    back = load(path)
    assert back.busy is not None and back.busy.dtype == np.float32
    assert np.array_equal(back.busy, busy, equal_nan=True)
    assert (back.bitmaps == tr.bitmaps).all()
    known = np.delete(busy, 7)
    assert back.mean_busy() == pytest.approx(float(known.mean()))
    data = dumps(tr)
    _, _, hlen = struct.unpack_from("<8sHI", data)
    assert json.loads(data[14:14 + hlen])["busy"] is True
    assert sample().busy is None and sample().mean_busy() is None
    with pytest.raises(TraceError, match="busy fractions for 40 samples"):
        Trace(sample().bitmaps, 1001, 0.05, busy=busy[:3])
    # a header announcing busy fractions that the payload lacks
    with pytest.raises(TraceError, match="payload holds"):
        loads(_with_header(dumps(sample()), busy=True))


def _version_1(tr: Trace) -> bytes:
    """A version 1 file as pyvm wrote it before busy fractions: no ``busy`` field."""
    import zstandard

    payload = zstandard.ZstdCompressor().compress(tr.bitmaps.tobytes())
    header = tr.header(len(payload))
    del header["busy"]
    header["version"] = 1
    h = json.dumps(header).encode()
    return struct.pack("<8sHI", tracefmt.MAGIC, 1, len(h)) + h + payload


def test_reads_version_1_traces() -> None:
    tr = sample()
    back = loads(_version_1(tr), "old.trace")
    assert (back.bitmaps == tr.bitmaps).all() and back.busy is None
    assert back.notes == {"k": 1}
    # version 1 has no busy fractions, whatever its header says: the extra bytes are refused
    tr.busy = np.zeros(40, np.float32)
    data = bytearray(dumps(tr))
    struct.pack_into("<H", data, 8, 1)
    with pytest.raises(TraceError, match="payload holds"):
        loads(bytes(data))


def test_missing_file_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="cannot read trace"):
        load(str(tmp_path / "none"))


def test_workloads_have_their_patterns() -> None:
    idle = synthesize("idle:ram=4M,seconds=1")
    assert idle.npages == 1024 and idle.samples == 20 and idle.counts().sum() == 0
    sweep = synthesize("sweep:ram=4M,seconds=1,rate=2000,interval=100ms")
    assert sweep.counts().tolist() == [200] * 10
    assert np.flatnonzero(sweep.mask(1)).tolist() == list(range(200, 400))
    uni = synthesize("uniform:ram=64M,seconds=1,rate=10000")
    assert 450 < uni.counts().mean() <= 500        # 500 writes, a few repeats
    zipf = synthesize("zipf:ram=64M,seconds=2,rate=10000,s=1.2")
    assert zipf.counts().mean() < 0.5 * 500         # skewed: many repeats
    ph = synthesize("phases:ram=4M,seconds=4,rate=2000,busy=1,quiet=1")
    c = ph.counts()
    assert (c[:20] > 0).all() and (c[20:40] == 0).all() and (c[40:60] > 0).all()
    with pytest.raises(WorkloadError, match="unknown workload 'nope'"):
        synthesize("nope")
    with pytest.raises(WorkloadError, match="has no parameter 'speed'"):
        synthesize("uniform:speed=3")


def test_working_set_windows() -> None:
    tr = synthesize("sweep:ram=4M,seconds=2,rate=1000,interval=100ms")
    xs, pages = wws_series(tr, 0.5)
    assert xs.tolist() == pytest.approx([0.0, 0.5, 1.0, 1.5])
    assert pages.tolist() == [500] * 4
    text = summary(tr, (0.5, 1.0), file_bytes=100)
    assert "1024 pages" in text and "ever written  1024 pages" in text
    assert "     0.5 s     500.0       500" in text
