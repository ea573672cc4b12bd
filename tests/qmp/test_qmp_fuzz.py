"""Fuzzing the monitor with hypothesis while the guest runs.

- codec: any bytes, in any split, give the same items and never raise;
- live, against an in-process FakeVm and against the real ``python -m pyvm``: thousands
  of random and mutated requests over a socket; every complete message gets exactly one
  reply, malformed bytes get parse errors, the guest keeps running (it makes progress)
  and the monitor still answers query-status at the end.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from qmp_helpers import RawClient, has_invalid_text, pyvm_runs, start_pyvm, wait_for
from fake_vm import FakeVm
from pyvm.qmp.json_stream import JsonStreamer
from pyvm.qmp.options import parse_monitor_options
from pyvm.qmp.core import build_tables
from pyvm.qmp.server import MonitorService

TABLE = build_tables().qmp
# Commands that would stop the guest or write files are left out of the live fuzz.
UNSAFE = {"stop", "quit", "pmemsave", "memsave", "human-monitor-command"}
SAFE_NAMES = [c.name for c in TABLE.commands() if c.name not in UNSAFE]

scalars = (st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12))
values = st.recursive(scalars, lambda c: st.lists(c, max_size=4)
                      | st.dictionaries(st.text(max_size=6), c, max_size=4), max_leaves=12)
requests = st.fixed_dictionaries(
    {"execute": st.sampled_from(SAFE_NAMES)},
    optional={"arguments": st.dictionaries(
                  st.sampled_from(["enable", "val", "size", "filename", "cpu-index",
                                   "command-line", "x"]), values, max_size=3),
              "id": values,
              "extra": values})
messages = requests | values | st.dictionaries(st.sampled_from(
    ["execute", "arguments", "id", "exec-oob"]), values, max_size=3)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=8))
def test_codec_split_invariance(data: bytes, cuts: list[int]) -> None:
    whole = JsonStreamer().feed(data)
    streamer = JsonStreamer()
    pieces: list[Any] = []
    last = 0
    for cut in sorted(set(c for c in cuts if c <= len(data))) + [len(data)]:
        pieces += streamer.feed(data[last:cut])
        last = cut
    assert pieces == whole


@settings(max_examples=300, deadline=None)
@given(st.lists(messages, min_size=1, max_size=6))
def test_codec_one_item_per_complete_message(batch: list[Any]) -> None:
    stream = b"".join(json.dumps(m).encode() + b"\n" for m in batch)
    assert len(JsonStreamer().feed(stream)) == len(batch)


class Live:
    """A negotiated client plus a way to see that the guest makes progress."""

    def __init__(self, client: RawClient, progress: Any) -> None:
        self.client = client
        self.progress = progress
        self.marker = 0

    def resync(self) -> None:
        """Drain whatever an earlier (failed) example left, up to a fresh marker."""
        self.marker += 1
        marker = f"resync-{self.marker}"
        self.client.send(b"\x01\n" + json.dumps({"execute": "query-kvm", "id": marker})
                         .encode())
        while self.client.reply().get("id") != marker:
            pass

    def assert_running(self) -> None:
        assert self.client.cmd("query-status", id="chk") == {
            "return": {"status": "running", "singlestep": False, "running": True}, "id": "chk"}


def _pyvm_counter(client: RawClient) -> int:
    reply = client.cmd("human-monitor-command", {"command-line": "xp /1xw 0x100000"})
    return int(reply["return"].split(":")[1], 16)


@pytest.fixture(scope="module", params=["fake-vm", pytest.param("pyvm", marks=pytest.mark.slow)])
def live(request: Any) -> Iterator[Live]:
    """The monitor under fuzz: in-process with a FakeVm, and the real pyvm process."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "f.sock")
        if request.param == "fake-vm":
            vm = FakeVm()
            vm.start_guest()
            svc = MonitorService(vm, parse_monitor_options([f"unix:{path},server=on"],
                                                           [], [], []))
            svc.start()
            client = RawClient(path)
            client.negotiate()
            live = Live(client, lambda: vm.ticks)

            def stop() -> None:
                svc.close()
                vm.stop_guest()
        else:
            assert pyvm_runs(), "python -m pyvm does not run"
            proc = start_pyvm("-qmp", f"unix:{path},server=on,wait=off", extra=("-S",))
            assert wait_for(lambda: os.path.exists(path) or proc.poll() is not None, 30)
            client = RawClient(path)
            client.negotiate()
            loaded = _pyvm_counter(client)
            client.cmd("cont")
            assert wait_for(lambda: _pyvm_counter(client) not in (loaded, 0), 20)
            live = Live(client, lambda: _pyvm_counter(client))

            def stop() -> None:
                client.cmd("quit")
                proc.wait(20)
        before = live.progress()
        yield live
        live.assert_running()
        assert wait_for(lambda: live.progress() > before, 10), "the guest stopped"
        stop()
        client.close()


def as_qemu_reads_it(value: Any) -> Any:
    """What QEMU's parser makes of a value: integers beyond int64/uint64 become doubles."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int) and not -(1 << 63) <= value < (1 << 64):
        return float(value)
    if isinstance(value, list):
        return [as_qemu_reads_it(v) for v in value]
    if isinstance(value, dict):
        return {k: as_qemu_reads_it(v) for k, v in value.items()}
    return value


def _has_invalid_text(value: Any) -> bool:
    """Strings QEMU's parser rejects (surrogates, noncharacters): the message fails to parse."""
    if isinstance(value, str):
        return has_invalid_text(value)
    if isinstance(value, list):
        return any(_has_invalid_text(v) for v in value)
    if isinstance(value, dict):
        return any(_has_invalid_text(k) or _has_invalid_text(v) for k, v in value.items())
    return False


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(messages, min_size=1, max_size=12))
def test_live_requests_each_get_one_reply(live: Live, batch: list[Any]) -> None:
    live.resync()
    client = live.client
    client.send(b"".join(json.dumps(m).encode() + b"\n" for m in batch))
    for message in batch:
        reply = client.reply()
        assert ("return" in reply) != ("error" in reply)
        if not isinstance(message, dict) or _has_invalid_text(message):
            assert "id" not in reply
        elif "id" in message:
            assert reply["id"] == as_qemu_reads_it(message["id"])
        else:
            assert "id" not in reply


@st.composite
def mutated(draw: Any) -> bytes:
    base = bytearray(json.dumps(draw(requests)).encode())
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "dup"]))
        pos = draw(st.integers(0, max(len(base) - 1, 0)))
        if kind == "flip" and base:
            base[pos] = draw(st.integers(0, 255))
        elif kind == "insert":
            base[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete" and base:
            del base[pos]
        elif kind == "truncate":
            del base[pos:]
        elif kind == "dup":
            base[pos:pos] = base[:pos]
    return bytes(base)


@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(mutated(), min_size=1, max_size=8))
def test_live_mutated_bytes_then_resync(live: Live, garbage: list[bytes]) -> None:
    live.resync()
    client = live.client
    for chunk in garbage:
        client.send(chunk)
    # An ASCII control character resets QEMU's JSON parser (docs/interop/qmp-spec).
    client.send(b"\x01\n{'execute': 'query-kvm', 'id': 'sync'}\n")
    while True:
        reply = client.reply()
        assert ("return" in reply) != ("error" in reply)
        if reply.get("id") == "sync" and "return" in reply:
            break
    live.assert_running()
