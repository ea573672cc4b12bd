"""The WAN harness: the relay's delay and loss on loopback; as root, a real migration
between two network namespaces shaped by tbf, and nothing left behind."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from pyvm.errors import PyvmError
from pyvm.guests import guest_path
from pyvm.lab.realvm import migrate
from pyvm.lab.wan import BUFFER, Relay, WanSpec, namespaces_left, wan_path
from pyvm.migration.transports.socket_transport import STREAM_SNDBUF


def _echo_server() -> tuple[socket.socket, threading.Thread]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
    t = threading.Thread(target=serve)
    t.start()
    return server, t


def _round_trip(spec: WanSpec, payload: bytes) -> float:
    server, thread = _echo_server()
    relay = Relay(("127.0.0.1", 0), server.getsockname()[:2], spec)
    try:
        with socket.create_connection(relay.address) as c:
            t0 = time.monotonic()
            c.sendall(payload)
            got = b""
            while len(got) < len(payload):
                got += c.recv(65536)
            took = time.monotonic() - t0
            assert got == payload
        return took
    finally:
        relay.close()
        thread.join(timeout=5)
        server.close()


def test_relay_delays_both_ways() -> None:
    assert 0.1 <= _round_trip(WanSpec(delay=0.05), b"ping") < 1.0
    assert _round_trip(WanSpec(), b"ping") < 0.05


def test_relay_loss_costs_round_trips() -> None:
    payload = os.urandom(1448 * 40)
    clean = _round_trip(WanSpec(delay=0.005), payload)
    lossy = _round_trip(WanSpec(delay=0.005, loss=0.5), payload)
    assert lossy > clean + 0.1          # about 20 lost segments x 10 ms each way


def test_wan_spec_parse() -> None:
    s = WanSpec.parse("rate=100Mbit,delay=10ms,loss=0.001")
    assert (s.rate, s.delay, s.loss) == (12.5e6, 0.01, 0.001)
    for bad in ("rate", "speed=1", "loss=2", "delay=fast"):
        with pytest.raises(PyvmError):
            WanSpec.parse(bad)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and tc need root")
def test_migration_over_shaped_namespaces(tmp_path) -> None:
    rate = 40e6 / 8                      # 40 Mbit/s
    with wan_path("rate=40Mbit,delay=5ms") as path:
        assert len(namespaces_left()) >= 2
        r = migrate(guest_path("dirty.elf"), "start=2 size=16 pattern=3 rate=0 busy=30 quiet=100000", "32M", "qemu",
                    workdir=str(tmp_path), warmup=1.0, src_prefix=path.src_prefix,
                    dst_prefix=path.dst_prefix, uri=path.uri, incoming=path.incoming,
                    timeout=60)
    assert r.status == "completed", r.error
    assert not [n for n in namespaces_left() if n.startswith(f"pyvmlab-{os.getpid() % 100000}-")]
    assert r.bytes_sent > 16 << 20
    # tbf holds the stream to the rate.  The source is done once its last bytes are in
    # its socket's send buffer (pyvm asks for 4 MiB, which Linux doubles), the relay's
    # buffers and tbf's queue: those bytes are still on their way when it reports.
    in_flight = 2 * STREAM_SNDBUF + 4 * BUFFER + int(rate * 0.1)
    assert (r.bytes_sent - in_flight) / r.total_time < rate * 1.15, (r.bytes_sent, r.total_time)


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and tc need root")
def test_wan_path_cleans_up_on_error() -> None:
    with pytest.raises(RuntimeError):
        with wan_path("rate=10Mbit"):
            raise RuntimeError("inside")
    assert not [n for n in namespaces_left() if n.startswith(f"pyvmlab-{os.getpid() % 100000}-")]
