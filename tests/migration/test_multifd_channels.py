"""The multifd sender and receiver threads joined by socketpairs, without a VM: pages of
one round land in the destination's memory before the flush barrier lets the loader on,
zero pages stay in the main stream, and a corrupt packet stops everything with QEMU's text."""

from __future__ import annotations

import socket
import threading

import numpy as np
import pytest

from pyvm.migration.control.channel import PageRun
from pyvm.migration.control.multifd_channel import (MULTIFD_FLUSH_RECORD, MultifdChannel,
                                                    MultifdConfig)
from pyvm.migration.control.multifd_incoming import MultifdIncoming, MultifdLoadError
from pyvm.migration.stream.constants import RAM_SAVE_FLAG_ZERO
from pyvm.migration.stream.ram_format import StreamBlock
from pyvm.migration.transports.socket_transport import SocketIncoming, SocketOutgoing

PAGES = 600
UUID = bytes(range(16))


class _Pairs:
    def __init__(self, n: int) -> None:
        self.out: list[SocketOutgoing] = []
        self.inc: list[SocketIncoming] = []
        for i in range(n):
            a, b = socket.socketpair()
            self.out.append(SocketOutgoing(a, description=f"pair{i}"))
            self.inc.append(SocketIncoming(b, description=f"pair{i}"))

    def connect(self):
        it = iter(self.out)
        return lambda: next(it)

    def accept(self):
        it = iter(self.inc)
        return lambda: next(it)


def _read_main(conn: SocketIncoming, stop: threading.Event, into: bytearray) -> None:
    buf = bytearray(1 << 16)
    while not stop.is_set():
        try:
            n = conn.readinto(buf)
        except Exception:
            return
        if not n:
            return
        into += buf[:n]


@pytest.mark.parametrize("compression,channels", [("none", 2), ("zlib", 3), ("zstd", 1)])
def test_round_lands_before_the_flush_barrier(compression, channels) -> None:
    rng = np.random.default_rng(5)
    src = rng.integers(0, 255, PAGES * 4096, dtype=np.uint8)
    src.reshape(PAGES, 4096)[::7] = 0                       # some zero pages
    dst = np.zeros_like(src)
    dst.reshape(PAGES, 4096)[::7] = 0xAA                    # stale data the ZERO records fix
    pairs = _Pairs(channels + 1)
    incoming = MultifdIncoming(channels, compression, UUID,
                               lambda name: dst if name == "pc.ram" else None)
    config = MultifdConfig(channels=channels, compression=compression, uuid=UUID)
    opened: list[MultifdChannel] = []
    t = threading.Thread(target=lambda: opened.append(MultifdChannel.open(pairs.connect(), config)))
    t.start()
    main_out = pairs.out[0]
    t.join(10)
    channel = opened[0]
    # the main channel starts with the stream magic the destination recognises it by
    channel.write_stream([b"QEVM"])
    main = incoming.open(pairs.accept())
    received = bytearray()
    stop = threading.Event()
    reader = threading.Thread(target=_read_main, args=(main, stop, received))
    reader.start()
    block = StreamBlock("pc.ram", src.nbytes, 0, src)
    moved = sum(n for n, _ in channel.send_pages(PageRun(block, 0, np.arange(PAGES))))
    assert moved == PAGES
    channel.end_round()
    incoming.flush()                                         # every channel reached its SYNC
    nonzero = np.ones(PAGES, dtype=bool)
    nonzero[::7] = False
    assert np.array_equal(dst.reshape(PAGES, 4096)[nonzero], src.reshape(PAGES, 4096)[nonzero])
    channel.flush()
    channel.close()
    stop.set()
    reader.join(10)
    # the main stream: the magic, ZERO records for the zero pages, then the flush mark
    assert bytes(received[:4]) == b"QEVM"
    assert bytes(received[-8:]) == MULTIFD_FLUSH_RECORD
    assert int.from_bytes(received[4:12], "big") & RAM_SAVE_FLAG_ZERO
    assert channel.compression_ratio is not None
    incoming.stop()
    incoming.join(10)
    assert main_out.bytes_written > 0


def test_corrupt_packet_stops_every_channel_with_qemus_text() -> None:
    pairs = _Pairs(2)
    dst = np.zeros(16 * 4096, dtype=np.uint8)
    incoming = MultifdIncoming(1, "none", UUID, lambda name: dst)
    pairs.out[0].write(b"QEVM")
    from pyvm.migration.stream.multifd_format import encode_initial_packet
    pairs.out[1].write(encode_initial_packet(UUID, 0))
    main = incoming.open(pairs.accept())
    bad = bytearray(1344)
    bad[:4] = b"\x00\x00\x00\x01"
    pairs.out[1].write(bytes(bad))
    with pytest.raises(MultifdLoadError, match="^multifd: received packet magic 1 and expected "
                                               "magic 11223344$"):
        incoming.flush()
    # the main channel was shut too, so the loader's read ends at once
    assert main.read(16) == b"QEVM"                           # the bytes read to tell it apart
    with pytest.raises(Exception, match="Unable to read from socket"):
        main.readinto(bytearray(16))
    assert not dst.any()                                      # nothing was written
    incoming.stop()
    incoming.join(10)
