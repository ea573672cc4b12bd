"""The QMP monitor over TLS (``-chardev socket,...,tls-creds=ID[,tls-authz=ID]`` + ``-mon``):
a client with the right certificate speaks QMP over Python's ssl socket; clients without
the right certificate, with a name the authz object denies, or without TLS at all are
dropped before the greeting while the VM keeps serving; misconfigurations give QEMU's
texts.  (qemu.qmp's QMPClient connects with an SSL context too, but on Python 3.11 its
``disconnect()`` can wait for ever in ``StreamWriter.drain`` on an SSL transport, so the
tests speak QMP themselves.)"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import guest
from tests.pki import CLIENT_DN
from tests.ports import free_port
from tests.waiting import wait_until

MEMCHECK = ["-m", "32M", "-kernel", guest("memcheck.elf"), "-append", "start=1 size=4",
            "-display", "none"]
DN_OPT = CLIENT_DN.replace(",", ",,")


def _client_context(creds: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(creds / "ca-cert.pem"))
    if (creds / "client-cert.pem").exists():
        ctx.load_cert_chain(str(creds / "client-cert.pem"), str(creds / "client-key.pem"))
    return ctx


def _query_status(port: int, ctx: ssl.SSLContext) -> Any:
    """Greeting, qmp_capabilities, query-status over TLS; ConnectionError when dropped."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            reader = tls.makefile("rb")

            def line() -> Any:
                data = reader.readline()
                if not data:
                    raise ConnectionError("the monitor closed the connection")
                return json.loads(data)
            assert "QMP" in line()
            tls.sendall(b'{"execute": "qmp_capabilities"}\r\n')
            assert line() == {"return": {}}
            tls.sendall(b'{"execute": "query-status"}\r\n')
            return line()["return"]


def _tls_monitor_args(pki: dict[str, Path], port: int, authz: bool) -> list[str]:
    args = ["-object", f"tls-creds-x509,id=tls0,dir={pki['server']},endpoint=server,verify-peer=on"]
    chardev = f"socket,id=mon0,host=127.0.0.1,port={port},server=on,wait=off,tls-creds=tls0"
    if authz:
        args += ["-object", f"authz-simple,id=auth0,identity={DN_OPT}"]
        chardev += ",tls-authz=auth0"
    return [*args, "-chardev", chardev, "-mon", "chardev=mon0,mode=control"]


@pytest.mark.parametrize("authz", [False, True], ids=["x509", "x509+authz-simple"])
def test_qmp_over_tls_accepts_the_right_client_and_drops_the_others(vms, pki, authz: bool) -> None:
    port = free_port()
    vm = vms("tlsmon", *MEMCHECK, *_tls_monitor_args(pki, port, authz))
    vm.wait_serial("memcheck gen 1 ok")
    status = _query_status(port, _client_context(pki["client"]))
    assert status["status"] == "running"
    refused = ["nocert", "rogue"] + (["other"] if authz else [])
    for creds in refused:
        with pytest.raises((ConnectionError, ssl.SSLError)):
            _query_status(port, _client_context(pki[creds]))
    # a client speaking plain QMP gets no greeting: the connection ends
    with socket.create_connection(("127.0.0.1", port), timeout=20) as plain:
        plain.sendall(b'{"execute": "qmp_capabilities"}\r\n')
        data = b""
        while chunk := plain.recv(4096):
            data += chunk
        assert b"QMP" not in data
    # the VM and its monitors still work
    assert vm.status() == "running"
    assert _query_status(port, _client_context(pki["client"]))["status"] == "running"
    assert "Traceback" not in vm.stderr()


@pytest.mark.parametrize("chardev, objects, text", [
    ("socket,id=m,path={tmp}/m.sock,server=on,wait=off,tls-creds=tls0", "server",
     "TLS can only be used over TCP socket"),
    ("socket,id=m,host=127.0.0.1,port=0,server=on,wait=off,tls-authz=a", "server",
     "'tls_authz' option requires 'tls_creds' option"),
    ("socket,id=m,host=127.0.0.1,port=0,server=on,wait=off,tls-creds=nope", "server",
     "No TLS credentials with id 'nope'"),
    ("socket,id=m,host=127.0.0.1,port=0,server=on,wait=off,tls-creds=tls0", "client",
     "Expected TLS credentials for a server endpoint"),
])
def test_tls_monitor_misconfigurations_give_qemus_texts(pki, tmp_path: Path, chardev: str,
                                                        objects: str, text: str) -> None:
    value = chardev.format(tmp=tmp_path)
    endpoint_dir = pki["server"] if objects == "server" else pki["client"]
    proc = subprocess.run([sys.executable, "-m", "pyvm", *MEMCHECK, "-object",
                           f"tls-creds-x509,id=tls0,dir={endpoint_dir},endpoint={objects}",
                           "-chardev", value, "-mon", "chardev=m,mode=control"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr == f"pyvm: -chardev {value}: {text}\n"


def test_monitor_authz_refusal_names_the_certificate_dn_not_the_address(vms, pki) -> None:
    """QEMU's authz refusal names the peer certificate's distinguished name
    (crypto/tlssession.c); the log line must too, and never the client's address."""
    port = free_port()
    vm = vms("tlsdn", *MEMCHECK, *_tls_monitor_args(pki, port, authz=True))
    vm.wait_serial("memcheck gen 1 ok")
    with pytest.raises((ConnectionError, ssl.SSLError)):
        _query_status(port, _client_context(pki["other"]))
    text = "TLS x509 authz check for CN=intruder.example.com,O=pyvm test,C=GB is denied"
    wait_until(lambda: text in vm.stderr(), 15, what="the authz refusal on stderr")
    refusal = next(line for line in vm.stderr().splitlines() if "authz check" in line)
    assert "127.0.0.1" not in refusal
    assert _query_status(port, _client_context(pki["client"]))["status"] == "running"


def test_qmp_over_tls_psk(vms, tmp_path: Path) -> None:
    """``tls-creds-psk`` on the monitor: a client with the right key speaks QMP, one with
    a wrong key is dropped with QEMU's handshake text, the guest keeps running."""
    from pyvm.tls import make_object
    from pyvm.tls_pump import TlsPump, engine_for, handshake
    key = "0123456789abcdef" * 4
    for name, line in (("srv", f"qemu:{key}"), ("good", f"qemu:{key}"),
                       ("bad", "qemu:" + "ee" * 32)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "keys.psk").write_text(line + "\n")
    port = free_port()
    vm = vms("pskmon", *MEMCHECK,
             "-object", f"tls-creds-psk,id=psk0,dir={tmp_path / 'srv'},endpoint=server",
             "-chardev", f"socket,id=mon0,host=127.0.0.1,port={port},server=on,wait=off,"
                         "tls-creds=psk0", "-mon", "chardev=mon0,mode=control")
    vm.wait_serial("memcheck gen 1 ok")

    def status(creds: str) -> Any:
        obj = make_object("tls-creds-psk", {"id": creds, "dir": str(tmp_path / creds),
                                            "endpoint": "client"})
        raw = socket.create_connection(("127.0.0.1", port), timeout=20)
        engine = engine_for(obj, False, None)  # type: ignore[arg-type]
        handshake(raw, engine)
        pump = TlsPump(raw, engine, "test-psk-client")
        try:
            with pump.plain as s:
                s.settimeout(20)
                reader = s.makefile("rb")

                def line() -> Any:
                    data = reader.readline()
                    if not data:
                        raise ConnectionError("the monitor closed the connection")
                    return json.loads(data)
                assert "QMP" in line()
                s.sendall(b'{"execute": "qmp_capabilities"}\r\n')
                assert line() == {"return": {}}
                s.sendall(b'{"execute": "query-status"}\r\n')
                return line()["return"]
        finally:
            pump.join(5)
            if pump.alive:
                pump.stop()
                pump.join()

    assert status("good")["status"] == "running"
    from pyvm.tls import TlsError
    with pytest.raises((TlsError, ConnectionError)):
        status("bad")
    wait_until(lambda: "TLS handshake failed" in vm.stderr(), 15, what="the refusal")
    assert status("good")["status"] == "running"
    assert vm.status() == "running"
    vm.cmd("quit")                      # the PSK listener's threads are joined on the way out
    assert vm.wait_exit(20) == 0
    assert "Traceback" not in vm.stderr()
