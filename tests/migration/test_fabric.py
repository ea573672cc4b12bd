"""The rdma transport over libfabric's tcp provider on 127.0.0.1.

Destinations run in a thread of this process, or in a child process where a test kills one
end.  Every wait has a timeout, so a broken transport fails a test instead of hanging it.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import pytest

from pyvm.migration.transports import fabric
from tests.ports import free_port
from tests.waiting import wait_blocked
from pyvm.migration.transports.base import TransportCancelled, TransportError
from pyvm.migration.transports.fabric import FabricUnavailableError
from pyvm.migration.transports.rdma_protocol import (Compress, ControlType, RdmaError,
                                                     RdmaProtocolError, Register,
                                                     encode_compress, encode_message,
                                                     encode_register_requests)
from pyvm.migration.transports.rdma_transport import (RdmaIncoming, RdmaListener,
                                                      RdmaOutgoing)

MiB = 1 << 20
PAGE = 4096
ROOT = Path(__file__).resolve().parents[2]

needs_libfabric = pytest.mark.skipif(not fabric.available(),
                                     reason="the libfabric binding is not built")


@pytest.fixture
def tcp_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fabric.PROVIDER_ENV, "tcp")


def random_block(size: int, seed: int) -> mmap.mmap:
    block = mmap.mmap(-1, size)
    block[:] = random.Random(seed).randbytes(size)
    return block


class Destination:
    """An :class:`RdmaListener` whose accepted channel is read to the end by a thread."""

    def __init__(self, blocks: list[tuple[str, Any, int]], *, read: bool = True,
                 on_data: Optional[Callable[[RdmaIncoming, bytes], None]] = None,
                 timeout: float = 10.0) -> None:
        self.listener = RdmaListener("127.0.0.1", 0, timeout=timeout)
        self.host, self.port = self.listener.listen_address()
        self.blocks = blocks
        self.read = read
        self.on_data = on_data
        self.stream = bytearray()
        self.error: Optional[BaseException] = None
        self.incoming: Optional[RdmaIncoming] = None
        self.accepted = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.incoming = self.listener.accept(self.blocks, timeout=10)
            self.accepted.set()
            if not self.read:
                return
            buf = bytearray(256 * 1024)
            while True:
                got = self.incoming.readinto(buf)
                if not got:
                    break
                self.stream += buf[:got]
                if self.on_data is not None:
                    self.on_data(self.incoming, bytes(buf[:got]))
        except BaseException as err:  # noqa: B902 - reported by join()
            self.error = err
            self.accepted.set()

    def join(self, timeout: float = 30) -> bytes:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "destination did not finish"
        if self.error is not None:
            raise self.error
        return bytes(self.stream)

    def close(self) -> None:
        if self.incoming is not None:
            self.incoming.shutdown()
            self.incoming.close()
        self.listener.close()


@pytest.fixture
def destinations() -> Iterator[list[Destination]]:
    made: list[Destination] = []
    yield made
    for dest in made:
        dest.close()


# -- library and provider --------------------------------------------------------------------------
def test_missing_library_gives_one_clear_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fabric, "_binding", None)
    monkeypatch.setitem(sys.modules, fabric.BINDING, None)    # import now fails
    expected = ("RDMA ERROR: libfabric is not available (install Debian package libfabric1 / "
                "libfabric-dev and rebuild pyvm)")
    with pytest.raises(FabricUnavailableError) as info:
        RdmaListener("127.0.0.1", 0)
    assert str(info.value) == expected
    assert isinstance(info.value, TransportError)
    with pytest.raises(FabricUnavailableError, match="libfabric is not available"):
        RdmaOutgoing("127.0.0.1", 1, [("pc.ram", bytearray(PAGE), PAGE)])
    assert not fabric.available()


@needs_libfabric
def test_unknown_provider_is_named_in_the_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fabric.PROVIDER_ENV, "nosuchprovider")
    with pytest.raises(FabricUnavailableError) as info:
        RdmaListener("127.0.0.1", 0)
    assert str(info.value) == ("RDMA ERROR: no libfabric provider supports RMA over "
                               "FI_EP_MSG here (tried: nosuchprovider)")


@needs_libfabric
def test_default_provider_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(fabric.PROVIDER_ENV, raising=False)
    assert fabric.providers_to_try() == ("verbs", "tcp")
    assert fabric.providers_to_try("tcp") == ("tcp",)
    listener = RdmaListener("127.0.0.1", 0)
    try:
        binding = fabric.load_binding()
        has_verbs = bool(binding.getinfo("127.0.0.1", "0", True, "verbs"))
        assert listener.provider == ("verbs" if has_verbs else "tcp")
    finally:
        listener.close()


@needs_libfabric
def test_tcp_provider_offers_rma_over_msg_endpoints() -> None:
    infos = fabric.load_binding().getinfo("127.0.0.1", "0", True, "tcp")
    assert infos and all(info.provider == "tcp" for info in infos)
    assert infos[0].tx_size > 4


# -- stream bytes ----------------------------------------------------------------------------------
@needs_libfabric
@pytest.mark.usefixtures("tcp_provider")
def test_connect_accept_and_stream_bytes(destinations: list[Destination]) -> None:
    block = bytearray(2 * MiB)
    dest = Destination([("pc.ram", block, len(block))])
    destinations.append(dest)
    out = RdmaOutgoing(dest.host, dest.port, [("pc.ram", bytearray(2 * MiB), 2 * MiB)])
    assert out.provider == "tcp" and dest.listener.provider == "tcp"
    big = random.Random(1).randbytes(4 * MiB + 17)
    out.write(b"QEVM")
    out.writev([memoryview(big)[:MiB], b"", memoryview(big)[MiB:]])
    out.write(b"tail")
    assert out.bytes_written == 4 + len(big) + 4
    out.close()
    assert dest.join() == b"QEVM" + big + b"tail"
    assert dest.incoming is not None and dest.incoming.bytes_read == out.bytes_written
    assert dest.incoming.at_eof


@needs_libfabric
@pytest.mark.usefixtures("tcp_provider")
def test_close_right_after_writing_loses_no_bytes(destinations: list[Destination]) -> None:
    # Regression: disconnecting while the destination still sent grants reset the TCP
    # connection and dropped the last messages; close() now waits for every grant.
    for attempt in range(12):
        dest = Destination([("pc.ram", bytearray(PAGE), PAGE)])
        destinations.append(dest)
        out = RdmaOutgoing(dest.host, dest.port, [("pc.ram", bytearray(PAGE), PAGE)])
        payload = random.Random(attempt).randbytes(3 * MiB + attempt)
        out.write(payload)
        out.write(b"end")
        out.close()
        assert dest.join() == payload + b"end"


@needs_libfabric
@pytest.mark.usefixtures("tcp_provider")
def test_read_returns_partial_data_then_eof(destinations: list[Destination]) -> None:
    dest = Destination([("pc.ram", bytearray(MiB), MiB)], read=False)
    destinations.append(dest)
    out = RdmaOutgoing(dest.host, dest.port, [("pc.ram", bytearray(MiB), MiB)])
    out.write(b"0123456789")
    out.flush()
    assert dest.accepted.wait(10) and dest.incoming is not None
    assert dest.incoming.read(4) == b"0123"
    assert dest.incoming.read(100) == b"456789"
    out.close()
    assert dest.incoming.read(100) == b""


# -- RDMA writes -----------------------------------------------------------------------------------
def _sparse_pages(size: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    pages = sorted(rng.sample(range(size // PAGE), size // PAGE // 5))
    # A run long enough to merge across a chunk boundary, and the block's last page.
    pages = sorted(set(pages) | set(range(250, 700)) | {size // PAGE - 1})
    return [p * PAGE for p in pages]


def _expected(src: mmap.mmap, size: int, offsets: list[int]) -> bytes:
    out = bytearray(size)
    for off in offsets:
        out[off:off + PAGE] = src[off:off + PAGE]
    return bytes(out)


@needs_libfabric
@pytest.mark.usefixtures("tcp_provider")
@pytest.mark.parametrize("pin_all", [False, True])
def test_pages_land_in_the_destination_block(destinations: list[Destination],
                                             pin_all: bool) -> None:
    size = 8 * MiB
    src, dst = random_block(size, 2), mmap.mmap(-1, size)
    small_src, small_dst = random_block(64 * 1024, 3), bytearray(64 * 1024)
    hooks: list[int] = []

    def on_data(incoming: RdmaIncoming, data: bytes) -> None:
        if b"HOOK" in data:
            # What the loader relies on when it skips the hook: the round before it is
            # already finished by the time the stream bytes after it can be read.
            hooks.append(incoming.rounds_finished)

    dest = Destination([("pc.ram", dst, size), ("pc.bios", small_dst, len(small_dst))],
                       on_data=on_data)
    destinations.append(dest)
    out = RdmaOutgoing(dest.host, dest.port, [("pc.ram", src, size),
                                              ("pc.bios", small_src, len(small_src))],
                       pin_all=pin_all)
    assert out.pin_all is pin_all
    offsets = _sparse_pages(size, 4)
    out.place_pages(0, offsets, PAGE)
    out.place_pages(1, range(0, len(small_src), PAGE), PAGE)
    out.round_finished()
    out.write(b"HOOK")
    out.flush()
    # A second round rewrites changed pages of already registered chunks.
    src[0:PAGE] = b"\xa5" * PAGE
    out.place_pages(0, [0], PAGE)
    out.round_finished()
    out.write(b"HOOK")
    out.close()
    assert dest.join() == b"HOOKHOOK"
    assert len(hooks) == 2 and hooks[0] >= 1 and hooks[1] == 2
    assert dst[:] == _expected(src, size, offsets + [0])
    assert small_dst == small_src[:]
    assert out.pages_written == len(offsets) + 16 + 1
    assert out.rdma_bytes == out.pages_written * PAGE
    assert dest.incoming is not None
    if pin_all:
        assert out.registrations == 0 and dest.incoming.registrations == 2
    else:
        # Every chunk of the 8 MiB block is touched; contiguous ones share a registration.
        assert out.registrations == dest.incoming.registrations >= 2


@needs_libfabric
@pytest.mark.usefixtures("tcp_provider")
def test_zero_pages_of_unregistered_chunks_are_filled_not_registered(
        destinations: list[Destination]) -> None:
    size = 8 * MiB
    src = random_block(size, 8)
    src[2 * MiB:4 * MiB] = bytes(2 * MiB)
    zero_in_chunk0 = [5 * PAGE, 6 * PAGE, 100 * PAGE]
    for off in zero_in_chunk0:
        src[off:off + PAGE] = bytes(PAGE)
    dst = mmap.mmap(-1, size)
    dst[:] = b"\xee" * size                     # stale memory the fills must clear
    dest = Destination([("pc.ram", dst, size)])
    destinations.append(dest)
    out = RdmaOutgoing(dest.host, dest.port, [("pc.ram", src, size)])
    data_pages = [o for o in range(0, 2 * MiB, PAGE) if o not in zero_in_chunk0]
    out.place_pages(0, data_pages, PAGE)
    out.place_zero_pages(0, zero_in_chunk0 + list(range(2 * MiB, 4 * MiB, PAGE)), PAGE)
    out.round_finished()
    out.close()
    dest.join()
    assert dst[:4 * MiB] == src[:4 * MiB]
    assert dst[4 * MiB:] == b"\xee" * (4 * MiB)
    assert out.zero_pages == 3 + 512 and out.pages_written == 512 - 3
    # Chunks 0-1 hold data (one registration); the zero chunks 2-3 were never registered.
    assert dest.incoming is not None and dest.incoming.registrations == 1
    assert out.rdma_bytes == 2 * MiB


@needs_libfabric
@pytest.mark.usefixtures("tcp_provider")
def test_on_demand_registration_of_local_chunks(destinations: list[Destination],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # Providers with FI_MR_LOCAL need the write source registered too, chunk by chunk.
    monkeypatch.setattr(RdmaOutgoing, "register_local_memory", True)
    size = 6 * MiB
    src, dst = random_block(size, 5), mmap.mmap(-1, size)
    dest = Destination([("pc.ram", dst, size)])
    destinations.append(dest)
    out = RdmaOutgoing(dest.host, dest.port, [("pc.ram", src, size)])
    offsets = [o for o in range(0, size, PAGE) if (o // PAGE) % 3 != 1]
    out.place_pages(0, offsets, PAGE)
    out.round_finished()
    out.close()
    dest.join()
    assert dst[:] == _expected(src, size, offsets)


@needs_libfabric
@pytest.mark.slow
@pytest.mark.usefixtures("tcp_provider")
@pytest.mark.parametrize("pin_all", [False, True])
def test_a_64_mib_region(destinations: list[Destination], pin_all: bool) -> None:
    size = 64 * MiB
    src, dst = mmap.mmap(-1, size), mmap.mmap(-1, size)
    src[:] = os.urandom(size)
    dest = Destination([("pc.ram", dst, size)])
    destinations.append(dest)
    out = RdmaOutgoing(dest.host, dest.port, [("pc.ram", src, size)], pin_all=pin_all)
    out.place_pages(0, range(0, size, PAGE), PAGE)
    out.round_finished()
    out.close()
    dest.join()
    assert hashlib.sha256(dst).digest() == hashlib.sha256(src).digest()


@needs_libfabric
@pytest.mark.usefixtures("tcp_provider")
def test_block_mismatch_is_refused(destinations: list[Destination]) -> None:
    dest = Destination([("pc.ram", bytearray(2 * MiB), 2 * MiB)])
    destinations.append(dest)
    with pytest.raises(RdmaError,
                       match=r"Block pc.ram/0 has a different length 1048576 vs 2097152"):
        RdmaOutgoing(dest.host, dest.port, [("pc.ram", bytearray(MiB), MiB)])
    dest2 = Destination([("pc.ram", bytearray(MiB), MiB)])
    destinations.append(dest2)
    with pytest.raises(RdmaError, match=r"ram blocks mismatch \(Number of blocks 2 vs 1\)"):
        RdmaOutgoing(dest2.host, dest2.port, [("pc.ram", bytearray(MiB), MiB),
                                              ("pc.bios", bytearray(PAGE), PAGE)])


@needs_libfabric
@pytest.mark.usefixtures("tcp_provider")
def test_pages_outside_the_block_are_refused(destinations: list[Destination]) -> None:
    dest = Destination([("pc.ram", bytearray(MiB), MiB)])
    destinations.append(dest)
    out = RdmaOutgoing(dest.host, dest.port, [("pc.ram", bytearray(MiB), MiB)])
    with pytest.raises(ValueError):
        out.place_pages(0, [MiB], PAGE)
    with pytest.raises(RdmaError, match="index 1 out of range"):
        out.place_pages(1, [0], PAGE)
    out.close()
    dest.join()


@needs_libfabric
@pytest.mark.usefixtures("tcp_provider")
@pytest.mark.parametrize("request_bytes, text", [
    (encode_register_requests([Register(64 * MiB, 0, 0)]), "REGISTER_REQUEST outside block 0"),
    (encode_register_requests([Register(0, 3, 0)]), "REGISTER_REQUEST for unknown block 3"),
    (encode_register_requests([Register(0, 0, 1)]), "REGISTER_REQUEST outside block 0"),
    (encode_compress([Compress(0, 0, MiB - PAGE, 2 * PAGE)]), "COMPRESS outside block 0"),
    (encode_message(ControlType.READY), "unexpected READY from the source"),
])
def test_a_bad_request_fails_both_ends(destinations: list[Destination], request_bytes: bytes,
                                       text: str) -> None:
    block = bytearray(MiB)
    dest = Destination([("pc.ram", block, MiB)])
    destinations.append(dest)
    out = RdmaOutgoing(dest.host, dest.port, [("pc.ram", bytearray(MiB), MiB)], timeout=5)
    with pytest.raises(RdmaError, match="reported an error|closed by the peer"):
        out._request(request_bytes, ControlType.REGISTER_RESULT, "test request")
    with pytest.raises(RdmaProtocolError, match=text):
        dest.join()
    assert block == bytes(MiB)
    out.close()


# -- failures --------------------------------------------------------------------------------------
@needs_libfabric
@pytest.mark.usefixtures("tcp_provider")
def test_refused_connection() -> None:
    port = free_port()
    start = time.monotonic()
    with pytest.raises(RdmaError) as info:
        RdmaOutgoing("127.0.0.1", port, [("pc.ram", bytearray(PAGE), PAGE)])
    assert str(info.value) == (f"RDMA ERROR: connecting to destination 127.0.0.1:{port} "
                               "failed: Connection refused")
    assert time.monotonic() - start < 5


@needs_libfabric
@pytest.mark.usefixtures("tcp_provider")
def test_unresolvable_address() -> None:
    with pytest.raises(RdmaError) as info:
        RdmaOutgoing("nosuchhost.invalid", 4444, [("pc.ram", bytearray(PAGE), PAGE)])
    assert str(info.value) == ("RDMA ERROR: could not resolve address nosuchhost.invalid:4444 "
                               "(providers: tcp)")


@needs_libfabric
@pytest.mark.usefixtures("tcp_provider")
def test_ipv6_loopback() -> None:
    listener = RdmaListener("::1", 0)
    host, port = listener.listen_address()
    assert host == "::1" and port > 0
    block = bytearray(MiB)
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(
        listener.accept([("pc.ram", block, MiB)], timeout=10)))
    thread.start()
    src = random_block(MiB, 7)
    out = RdmaOutgoing("::1", port, [("pc.ram", src, MiB)])
    assert out.peer == f"[::1]:{port}"
    out.place_pages(0, range(0, MiB, PAGE), PAGE)
    out.round_finished()
    out.write(b"end")
    out.close()
    thread.join(10)
    incoming = result[0]
    assert incoming.read(10) == b"end" and incoming.read(10) == b""
    incoming.close()
    listener.close()
    assert block == src[:]


@needs_libfabric
@pytest.mark.usefixtures("tcp_provider")
def test_shutdown_aborts_a_blocked_write(destinations: list[Destination]) -> None:
    # The destination never reads: its queue fills, it stops granting buffers and the
    # source blocks until shutdown() from another thread.
    dest = Destination([("pc.ram", bytearray(MiB), MiB)], read=False)
    destinations.append(dest)
    out = RdmaOutgoing(dest.host, dest.port, [("pc.ram", bytearray(MiB), MiB)], timeout=30)
    chunk = bytes(MiB)
    timer = threading.Timer(1.0, out.shutdown)
    timer.start()
    start = time.monotonic()
    with pytest.raises(TransportCancelled):
        for _ in range(256):
            out.write(chunk)
    assert time.monotonic() - start < 10
    out.close()


@needs_libfabric
@pytest.mark.usefixtures("tcp_provider")
def test_a_stalled_destination_times_out(destinations: list[Destination]) -> None:
    dest = Destination([("pc.ram", bytearray(MiB), MiB)], read=False)
    destinations.append(dest)
    out = RdmaOutgoing(dest.host, dest.port, [("pc.ram", bytearray(MiB), MiB)], timeout=1.0)
    with pytest.raises(RdmaError, match=r"no progress for 1 s"):
        for _ in range(256):
            out.write(bytes(MiB))
    out.close()


@needs_libfabric
@pytest.mark.usefixtures("tcp_provider")
def test_closing_the_listener_aborts_accept() -> None:
    listener = RdmaListener("127.0.0.1", 0)
    errors: list[BaseException] = []

    def accept() -> None:
        try:
            listener.accept([("pc.ram", bytearray(PAGE), PAGE)])
        except BaseException as err:  # noqa: B902
            errors.append(err)

    thread = threading.Thread(target=accept)
    thread.start()
    wait_blocked(thread)
    listener.close()
    thread.join(5)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], TransportCancelled)


_CHILD_DESTINATION = textwrap.dedent("""
    import sys, time
    from pyvm.migration.transports.rdma_transport import RdmaListener
    size = int(sys.argv[1])
    listener = RdmaListener("127.0.0.1", 0)
    print(listener.listen_address()[1], flush=True)
    incoming = listener.accept([("pc.ram", bytearray(size), size)], timeout=20)
    print("accepted", flush=True)
    while incoming.read(1 << 16):
        time.sleep(0.01)            # a slow loader: the source keeps having work
""")

_CHILD_SOURCE = textwrap.dedent("""
    import sys
    from pyvm.migration.transports.rdma_transport import RdmaOutgoing
    port, size = int(sys.argv[1]), int(sys.argv[2])
    out = RdmaOutgoing("127.0.0.1", port, [("pc.ram", bytearray(size), size)])
    out.write(b"x" * (1 << 20))
    out.flush()
    print("sent", flush=True)
    sys.stdin.read()                # until killed
""")


def _child(script: str, *args: object) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYVM_RDMA_PROVIDER="tcp")
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _read_line(proc: subprocess.Popen[str], timeout: float = 20) -> str:
    result: list[str] = []
    assert proc.stdout is not None
    stdout = proc.stdout
    reader = threading.Thread(target=lambda: result.append(stdout.readline()))
    reader.start()
    reader.join(timeout)
    assert result and result[0], "child process did not report"
    return result[0].strip()


@needs_libfabric
@pytest.mark.slow
@pytest.mark.usefixtures("tcp_provider")
def test_destination_killed_mid_transfer() -> None:
    size = 16 * MiB
    proc = _child(_CHILD_DESTINATION, size)
    try:
        port = int(_read_line(proc))
        src = random_block(size, 6)
        out = RdmaOutgoing("127.0.0.1", port, [("pc.ram", src, size)], timeout=10)
        assert _read_line(proc) == "accepted"
        threading.Timer(0.5, proc.kill).start()
        start = time.monotonic()
        with pytest.raises(RdmaError) as info:
            for _ in range(400):
                out.place_pages(0, range(0, size, PAGE), PAGE)
                out.write(bytes(MiB))
                out.round_finished()
        assert time.monotonic() - start < 12
        assert not isinstance(info.value, TransportCancelled)
        out.close()
    finally:
        proc.kill()
        proc.wait(10)


@needs_libfabric
@pytest.mark.slow
@pytest.mark.usefixtures("tcp_provider")
def test_source_killed_mid_transfer_ends_the_input(destinations: list[Destination]) -> None:
    size = MiB
    dest = Destination([("pc.ram", bytearray(size), size)])
    destinations.append(dest)
    proc = _child(_CHILD_SOURCE, dest.port, size)
    try:
        assert _read_line(proc) == "sent"
        proc.kill()
        proc.wait(10)
        dest.thread.join(15)
        assert not dest.thread.is_alive(), "the destination hangs after the source died"
        # What arrived before the kill is intact; the end is an EOF or a transport error.
        assert dest.stream == b"x" * len(dest.stream)
        assert dest.error is None or isinstance(dest.error, TransportError)
    finally:
        proc.kill()
        proc.wait(10)
