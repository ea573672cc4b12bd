"""Damaging real migration streams on purpose (tests and the torture suite; sans-IO).

:func:`split_stream` cuts a complete stream into its prefix (header and configuration),
its sections (each with its checksum when x-checksum is on) and its tail (EOF byte and
vmdesc), using pyvm's own decoder over an analyzer target.  The mutators return new byte
strings; :func:`mutations` yields a labelled family of them for a stream.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator

from pyvm.analyze import AnalyzerTarget, find_vmdesc
from pyvm.migration.stream.decoder import SectionLoaded, StreamDecoder
from pyvm.migration.stream.constants import QEMU_VM_SECTION_FULL, QEMU_VM_SECTION_START

# The ram START section opens every pyvm stream: type, be32 id 2, counted "ram".
RAM_START = b"\x01\x00\x00\x00\x02\x03ram"


@dataclass(frozen=True)
class Section:
    idstr: str
    instance_id: int
    section_type: int
    start: int
    end: int

    @property
    def opens(self) -> bool:
        """A START/FULL section (one per device), not a RAM PART/END continuation."""
        return self.section_type in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL)


@dataclass(frozen=True)
class SplitStream:
    data: bytes
    prefix_end: int
    sections: list[Section]

    @property
    def tail_start(self) -> int:
        return self.sections[-1].end

    def without(self, i: int) -> bytes:
        s = self.sections[i]
        return self.data[:s.start] + self.data[s.end:]

    def duplicated(self, i: int) -> bytes:
        s = self.sections[i]
        return self.data[:s.end] + self.data[s.start:s.end] + self.data[s.end:]

    def swapped(self, i: int, j: int) -> bytes:
        a, b = sorted((i, j))
        sa, sb = self.sections[a], self.sections[b]
        d = self.data
        return d[:sa.start] + d[sb.start:sb.end] + d[sa.end:sb.start] + d[sa.start:sa.end] + d[sb.end:]


def split_stream(data: bytes) -> SplitStream:
    """The section layout of a complete stream that pyvm's decoder accepts."""
    target = AnalyzerTarget(find_vmdesc(data), dump_memory=False, extract=False)
    try:
        dec = StreamDecoder(target)
        events = dec.feed(data) + dec.close()
    finally:
        target.close()
    loaded = [e for e in events if isinstance(e, SectionLoaded)]
    start = data.find(RAM_START)
    assert start > 0, "no ram START section"
    sections = []
    for e in loaded:
        sections.append(Section(e.idstr, e.instance_id, e.section_type, start, e.end_offset))
        start = e.end_offset
    return SplitStream(data, sections[0].start, sections)


def flip(data: bytes, offset: int, bit: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 1 << bit
    return bytes(out)


def mutations(split: SplitStream, rng: random.Random, random_count: int = 50
              ) -> Iterator[tuple[str, bytes]]:
    """(label, mutated stream) pairs: structural edits of every START/FULL section, cuts at
    every section boundary, then ``random_count`` each of bit flips, random cuts, garbage
    splices and huge lengths at random offsets inside the loaded part of the stream."""
    d = split.data
    opens = [i for i, s in enumerate(split.sections) if s.opens]
    for i in opens:
        s = split.sections[i]
        yield f"drop {s.idstr}", split.without(i)
        yield f"duplicate {s.idstr}", split.duplicated(i)
    for a, b in zip(opens, opens[1:]):
        yield f"swap {split.sections[a].idstr}/{split.sections[b].idstr}", split.swapped(a, b)
    for s in split.sections:
        yield f"cut before {s.idstr}@{s.start}", d[:s.start]
    yield "cut before EOF", d[:split.tail_start]
    end = split.tail_start
    for _ in range(random_count):
        off = rng.randrange(split.prefix_end, end)
        yield f"flip bit @{off}", flip(d, off, rng.randrange(8))
        cut = rng.randrange(0, end)
        yield f"cut @{cut}", d[:cut]
        off = rng.randrange(split.prefix_end, end)
        garbage = rng.randbytes(rng.randrange(1, 64))
        yield f"garbage @{off}", d[:off] + garbage + d[off + len(garbage):]
        off = rng.randrange(split.prefix_end, end - 4)
        yield f"huge length @{off}", d[:off] + b"\xff\xff\xff\xf0" + d[off + 4:]


_PAGE_CONTINUE = 0x28        # RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE (migration/ram.c)
_RECORD_FLAGS = {0x10, 0x22, 0x28}   # what may follow a page: EOS, ZERO|CONTINUE, PAGE|CONTINUE


def page_data_offsets(split: SplitStream) -> list[int]:
    """Offsets of the payloads of PAGE|CONTINUE records found in the RAM sections."""
    d = split.data
    found = []
    for s in split.sections:
        if s.idstr != "ram":
            continue
        k = s.start
        while k + 8 + 4096 + 8 <= s.end:
            word = int.from_bytes(d[k:k + 8], "big")
            after = int.from_bytes(d[k + 8 + 4096:k + 16 + 4096], "big")
            if word & 0xFFF == _PAGE_CONTINUE and after & 0xFFF in _RECORD_FLAGS:
                found.append(k + 8)
                k += 8 + 4096
            else:
                k += 1
    return found
