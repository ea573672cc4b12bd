"""Property tests: random device states and RAM round-trip; corrupted streams fail cleanly."""

from __future__ import annotations

from typing import Any, Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migration_fakes import PAGE, FakeDevice, FakeTarget, encode_stream
from pyvm.migration import StreamBlock, StreamDecoder
from pyvm.migration.errors import MigrationError
from pyvm.vmstate import Field, Subsection, VMStateDescription

SCALARS = {"uint8": (0, 255), "uint16": (0, 0xFFFF), "uint32": (0, 0xFFFFFFFF), "uint64": (0, (1 << 64) - 1),
           "int8": (-128, 127), "int16": (-0x8000, 0x7FFF), "int32": (-(1 << 31), (1 << 31) - 1),
           "int64": (-(1 << 63), (1 << 63) - 1)}


def _constant(value: bool) -> Callable[[Any], bool]:
    return lambda obj: value


@st.composite
def vmsds(draw: Any, name: str = "dev", depth: int = 0) -> VMStateDescription:
    version = draw(st.integers(1, 4))
    fields = []
    for i in range(draw(st.integers(0, 6))):
        ftype = draw(st.sampled_from(sorted(SCALARS) + ["bool", "buffer"]))
        fields.append(Field(f"{name.replace('/', '_')}_f{i}", ftype, count=draw(st.integers(1, 3)),
                            size=draw(st.integers(1, 9)) if ftype == "buffer" else 0,
                            version_id=draw(st.integers(0, version + 1))))
    subs = []
    if depth < 2:
        for j in range(draw(st.integers(0, 2))):
            sub = draw(vmsds(f"{name}/s{j}", depth + 1))
            subs.append(Subsection(sub, _constant(draw(st.booleans()))))
    return VMStateDescription(name, version, tuple(fields), minimum_version_id=1, subsections=tuple(subs))


def _value(draw: Any, f: Field) -> Any:
    one: st.SearchStrategy[Any]
    if f.type == "buffer":
        one = st.binary(min_size=f.size, max_size=f.size)
    elif f.type == "bool":
        one = st.booleans()
    else:
        one = st.integers(*SCALARS[f.type])
    return draw(one) if f.count == 1 else draw(st.lists(one, min_size=f.count, max_size=f.count))


@st.composite
def devices(draw: Any) -> FakeDevice:
    vmsd = draw(vmsds())
    dev = FakeDevice(vmsd)
    for f in FakeDevice._all_fields(vmsd):
        setattr(dev, f.name, _value(draw, f))
    return dev


def _sent_fields(vmsd: VMStateDescription, obj: Any) -> list[Field]:
    fields = [f for f in vmsd.fields if f.version_id <= vmsd.version_id]
    for sub in vmsd.subsections:
        if sub.needed(obj):
            fields += _sent_fields(sub.vmsd, obj)
    return fields


@st.composite
def rams(draw: Any) -> list[bytearray]:
    out = []
    for _ in range(draw(st.integers(1, 3))):
        pages = []
        for _ in range(draw(st.integers(1, 4))):
            kind = draw(st.sampled_from(["zero", "byte", "random"]))
            if kind == "zero":
                pages.append(bytes(PAGE))
            elif kind == "byte":
                pages.append(bytes([draw(st.integers(1, 255))]) * PAGE)
            else:
                pages.append(draw(st.binary(min_size=16, max_size=16)) * (PAGE // 16))
        out.append(bytearray(b"".join(pages)))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(devs=st.lists(devices(), max_size=3), ram=rams(), runstate=st.sampled_from(["running", "paused", "prelaunch"]),
       chunk=st.sampled_from([0, 1, 13, 4097]))
def test_random_states_round_trip(devs: list[FakeDevice], ram: list[bytearray], runstate: str, chunk: int) -> None:
    blocks = [StreamBlock(f"block{i}", len(r), 0, r) for i, r in enumerate(ram)]
    data = encode_stream(blocks, [("dev", i, d) for i, d in enumerate(devs)], runstate=runstate)
    dst_ram = [bytearray(b"\x5a" * len(r)) for r in ram]
    dst_devs = {("dev", i): FakeDevice(d.vmsd) for i, d in enumerate(devs)}
    target = FakeTarget([StreamBlock(f"block{i}", len(r), 0, r) for i, r in enumerate(dst_ram)], dst_devs)
    dec = StreamDecoder(target)
    step = chunk or len(data)
    for i in range(0, len(data), step):
        dec.feed(data[i:i + step])
    dec.close()
    assert dec.finished and target.runstate == runstate
    assert dst_ram == ram
    for i, d in enumerate(devs):
        got = dst_devs[("dev", i)]
        for f in _sent_fields(d.vmsd, d):
            assert getattr(got, f.name) == getattr(d, f.name), f.name
        assert got.post_loads == 1


GUARD = 64


def _fuzz_target() -> tuple[FakeTarget, list[bytearray], list[tuple[int, int]]]:
    """Destination blocks that are windows inside larger arrays with guard bytes around them."""
    arenas, blocks, spans = [], [], []
    for name, pages in (("pc.ram", 3), ("pc.bios", 1)):
        arena = bytearray(b"\xcc" * (GUARD + pages * PAGE + GUARD))
        arenas.append(arena)
        spans.append((GUARD, GUARD + pages * PAGE))
        blocks.append(StreamBlock(name, pages * PAGE, 0, memoryview(arena)[GUARD:GUARD + pages * PAGE]))
    devs = {("dev", 0): FakeDevice(_FUZZ_DEV.vmsd)}
    return FakeTarget(blocks, devs), arenas, spans


_FUZZ_DEV = FakeDevice(VMStateDescription("dev", 2, (Field("x", "uint32"), Field("b", "buffer", size=3)),
                                          subsections=(Subsection(VMStateDescription("dev/s", 1, (Field("y", "int8"),)),
                                                                  lambda o: True),)), x=5, b=b"abc", y=-1)


def _valid_stream() -> bytes:
    ram = bytearray(3 * PAGE)
    ram[PAGE:PAGE + 4] = b"data"
    bios = bytearray(b"\x90" * PAGE)
    return encode_stream([StreamBlock("pc.ram", len(ram), 0, ram), StreamBlock("pc.bios", len(bios), 0, bios)],
                         [("dev", 0, _FUZZ_DEV)])


VALID = _valid_stream()


@settings(max_examples=300, deadline=None)
@given(cut=st.integers(0, len(VALID)), flips=st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 7)),
                                                       max_size=4),
       chunk=st.sampled_from([1, 3, 64, 5000, len(VALID)]))
def test_corrupted_streams_only_raise_migration_errors(cut: int, flips: list[tuple[int, int]], chunk: int) -> None:
    data = bytearray(VALID)
    for pos, bit in flips:
        data[pos] ^= 1 << bit
    data = data[:cut]
    target, arenas, spans = _fuzz_target()
    dec = StreamDecoder(target)
    try:
        for i in range(0, len(data), chunk):
            dec.feed(bytes(data[i:i + chunk]))
        dec.close()
    except MigrationError:
        pass
    for arena, (start, end) in zip(arenas, spans):
        assert arena[:start] == b"\xcc" * start and arena[end:] == b"\xcc" * (len(arena) - end)
