"""Fake devices, RAM and a fake destination for the migration codec tests (no VM)."""

from __future__ import annotations

import tempfile
from typing import Any, Iterable

import numpy as np

from pyvm.fastpath import RecordBatch
from pyvm.migration import StreamBlock, StreamDecoder, StreamEncoder
from pyvm.migration.stream.ram_format import RamPageWriter
from pyvm.vmstate import Field, Subsection, VMStateDescription, default_value
from tests.stream_in_memory import join_chunks

PAGE = 4096

EXTRA_VMSD = VMStateDescription("fake-dev/extra", 1, (Field("extra", "uint16"),),
                                minimum_version_id=1)
FAKE_VMSD = VMStateDescription(
    name="fake-dev", version_id=2, minimum_version_id=1,
    fields=(Field("a", "uint8"), Field("regs", "int32", count=3),
            Field("blob", "buffer", size=5), Field("flag", "bool", version_id=2)),
    subsections=(Subsection(EXTRA_VMSD, lambda dev: dev.extra != 0),),
)


class FakeDevice:
    """A device with state in attributes, as pyvm devices keep it."""

    def __init__(self, vmsd: VMStateDescription = FAKE_VMSD, **values: Any) -> None:
        self.vmsd = vmsd
        self.post_loads = 0
        self.pre_saves = 0
        for f in self._all_fields(vmsd):
            setattr(self, f.name, default_value(f))
        for name, value in values.items():
            setattr(self, name, value)

    @staticmethod
    def _all_fields(vmsd: VMStateDescription) -> list[Field]:
        fields = list(vmsd.fields)
        for sub in vmsd.subsections:
            fields += FakeDevice._all_fields(sub.vmsd)
        return fields

    def state(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in self._all_fields(self.vmsd)}

    def pre_save(self) -> None:
        self.pre_saves += 1

    def post_load(self) -> None:
        self.post_loads += 1


def sample_device() -> FakeDevice:
    return FakeDevice(a=0x12, regs=[1, -2, 0x7FFFFFFF], blob=b"hello", flag=True, extra=7)


class FakeTarget:
    """A destination VM: named RAM blocks and devices by (idstr, instance_id)."""

    def __init__(self, blocks: list[StreamBlock], devices: dict[tuple[str, int], Any] | None = None,
                 machine: str | None = "pc-i440fx-8.2", caps: tuple[str, ...] | None = ()) -> None:
        self.blocks = {b.name: b for b in blocks}
        self.devices = devices or {}
        self.machine = machine
        self.caps = caps
        self.runstate: str | None = None
        self.lookups: list[tuple[str, int]] = []

    def machine_type(self) -> str | None:
        return self.machine

    def capabilities(self) -> tuple[str, ...] | None:
        return self.caps

    def ram_block(self, name: str, length: int) -> StreamBlock | None:
        self.lookups.append((name, length))
        return self.blocks.get(name)

    def device(self, idstr: str, instance_id: int) -> Any:
        return self.devices.get((idstr, instance_id))

    def set_runstate(self, runstate: str) -> None:
        self.runstate = runstate


def make_ram(npages: int, seed: int = 1) -> bytearray:
    """Guest RAM where some pages hold data and the others are zero."""
    ram = bytearray(npages * PAGE)
    for i in range(0, npages, 3):
        ram[i * PAGE:i * PAGE + 16] = bytes((seed + i + j) & 0xFF for j in range(16))
    return ram


def encode_stream(blocks: list[StreamBlock], devices: list[tuple[str, int, Any]],
                  runstate: str = "running", machine: str = "pc-i440fx-8.2",
                  caps: tuple[str, ...] = (), rounds: int = 2,
                  encoder: StreamEncoder | None = None) -> bytes:
    """A complete precopy stream: every page in round 1, then empty rounds, devices, EOF."""
    enc = encoder or StreamEncoder()
    ignore_shared = "x-ignore-shared" in caps
    out = enc.header() + enc.configuration(machine, caps) + enc.ram_setup(blocks, ignore_shared)
    for r in range(rounds):
        out += enc.ram_section_begin(final=(r == rounds - 1))
        if r == 0:
            for block in blocks:
                if block.ignored:
                    continue
                pages = range(block.length // PAGE)
                if enc.checksum:        # precopy's x-checksum path: pages summed as written
                    data = bytes(block.buffer)
                    zero = [not any(data[i * PAGE:(i + 1) * PAGE]) for i in pages]
                    out += enc.ram_pages(block, pages, zero)
                else:
                    out.append(ram_batch_bytes(enc, block, pages))
        out += enc.ram_eos()
    out += enc.device_sections(devices)
    out += enc.globalstate(runstate)
    out += enc.eof_and_vmdesc()
    return join_chunks(out)


def ram_batch_bytes(enc: StreamEncoder, block: StreamBlock, indices: Iterable[int],
                    known_zero: Iterable[bool] | None = None, batch_pages: int = 8) -> bytes:
    """The page records a stream channel (pyvm.migration.control.channel.StreamChannel)
    packs for ``indices`` with a fresh record writer, as it sends them: each batch written
    with its own ``send`` into a real file, read back.  Counted in ``enc``'s page totals."""
    idx = np.asarray(list(indices), dtype=np.int64)
    known = None if known_zero is None else np.asarray(list(known_zero), dtype=bool)
    batch = RecordBatch(batch_pages)
    records = RamPageWriter()
    with tempfile.TemporaryFile() as f:
        start = 0
        while start < idx.size:
            end, _, zeros = records.batch_run(batch, block, idx, start, known)
            enc.zero_pages += zeros
            enc.normal_pages += end - start - zeros
            start = end
            while batch.remaining:
                batch.send(f.fileno())
        f.seek(0)
        return f.read()


def decode_stream(data: bytes, target: FakeTarget, chunk: int = 0) -> StreamDecoder:
    """Feed ``data`` (in pieces of ``chunk`` bytes, or whole) and close the input."""
    dec = StreamDecoder(target)
    if chunk:
        for i in range(0, len(data), chunk):
            dec.feed(data[i:i + chunk])
    else:
        dec.feed(data)
    dec.close()
    return dec
