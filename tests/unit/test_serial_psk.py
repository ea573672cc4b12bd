"""The serial port's TCP socket with ``tls-creds-psk`` (in-process): a client with the
right key talks both ways through the TLS pump, one with a wrong key is refused and
reported while the port keeps serving, and no pump thread outlives the backend."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from pyvm.chardev import SocketBackend, parse_serial
from pyvm.tls import ObjectRegistry, TlsError, make_object
from pyvm.tls_pump import TlsPump, engine_for, handshake
from tests.unit.test_chardev import Sink, recv_until
from tests.waiting import wait_until

KEY = "00112233445566778899aabbccddeeff"


def _creds(tmp: Path, name: str, line: str, endpoint: str):  # type: ignore[no-untyped-def]
    d = tmp / name
    d.mkdir()
    (d / "keys.psk").write_text(line + "\n")
    return make_object("tls-creds-psk", {"id": name, "dir": str(d), "endpoint": endpoint})


def _client(port: int, creds) -> TlsPump:  # type: ignore[no-untyped-def]
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    engine = engine_for(creds, False, None)
    handshake(sock, engine)
    return TlsPump(sock, engine, "test-client-tls")


def test_psk_serial_round_trip_refusal_and_no_thread_left(tmp_path: Path, capfd) -> None:
    objects = ObjectRegistry()
    objects.add(_creds(tmp_path, "srv", f"qemu:{KEY}", "server"))
    backend = parse_serial("tcp:127.0.0.1:0,server=on,wait=off,tls-creds=srv", "serial0",
                           tls_objects=objects)
    assert isinstance(backend, SocketBackend)
    port = backend.address[1]
    sink = Sink()
    backend.set_receiver(sink)
    backend.start()
    try:
        bad = _creds(tmp_path, "bad", "qemu:" + "ff" * 16, "client")
        try:
            pump = _client(port, bad)
        except TlsError:
            pass                        # refused in the handshake
        else:
            pump.plain.sendall(b"intruder")
            pump.plain.settimeout(10)
            assert pump.plain.recv(100) == b""       # dropped
            pump.plain.close()
            pump.join(10)
        wait_until(lambda: "pyvm: serial0: TLS handshake failed" in capfd.readouterr().err
                   or False, 15, what="the refusal on stderr")
        assert sink.get() == b""
        good = _client(port, _creds(tmp_path, "good", f"qemu:{KEY}", "client"))
        wait_until(backend.is_open)
        good.plain.sendall(b"over psk")
        wait_until(lambda: sink.get() == b"over psk")
        backend.write(b"back")
        assert recv_until(good.plain, b"back") == b"back"
        good.plain.close()
        good.join(10)
        assert not good.alive
    finally:
        backend.close()
    assert not [t for t in threading.enumerate() if t.name.endswith("-tls")]
