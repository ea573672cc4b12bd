"""TLS on the serial port's TCP socket (``-serial tcp:...,tls-creds=ID[,tls-authz=ID]``,
QEMU's chardev-socket options), server and client ends, reached with ``pyvm-console
--tls-creds``: the right client talks to the guest (hello.elf echoes what it receives);
clients without a certificate, from another CA, or with a name the authz object denies
are refused with QEMU's texts on stderr while the guest keeps running."""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pyvm.chardev import parse_serial
from pyvm.errors import ConfigError
from pyvm.tls import ObjectRegistry, make_object
from tests.conftest import ROOT, guest
from tests.pki import CLIENT_DN
from tests.ports import free_port
from tests.waiting import wait_until

HELLO = ["-m", "32M", "-kernel", guest("hello.elf"), "-display", "none"]
DN_OPT = CLIENT_DN.replace(",", ",,")
WORD = "pyvm-tls-echo"


def _console(port: int, creds: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """pyvm-console types WORD over TLS and waits for its echo (an empty line after it)."""
    return subprocess.run([sys.executable, "-m", "pyvm.console_cli", f"127.0.0.1:{port}",
                           "--tls-creds", str(creds), "--type", WORD, "--prompt", "^$",
                           "--timeout", "15", *extra],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


@pytest.mark.parametrize("form", ["serial", "chardev"])
def test_tls_serial_round_trip_and_refusals(vms, pki, form: str) -> None:
    port = free_port()
    args = ["-object", f"tls-creds-x509,id=tls0,dir={pki['server']},endpoint=server,verify-peer=on",
            "-object", f"authz-simple,id=auth0,identity={DN_OPT}"]
    if form == "serial":
        args += ["-serial",
                 f"tcp:127.0.0.1:{port},server=on,wait=off,tls-creds=tls0,tls-authz=auth0"]
    else:
        args += ["-chardev", f"socket,id=ser0,host=127.0.0.1,port={port},server=on,wait=off,"
                             "tls-creds=tls0,tls-authz=auth0", "-serial", "chardev:ser0"]
    vm = vms("tlsserial", *HELLO, *args, serial=False)
    good = _console(port, pki["client"])
    assert good.returncode == 0, good.stderr
    assert WORD in good.stdout
    expected = {
        "nocert": "No certificate peers",
        "rogue": "The certificate hasn't got a known issuer",
        "other": "TLS x509 authz check for CN=intruder.example.com,O=pyvm test,C=GB is denied",
    }
    for creds, text in expected.items():
        bad = _console(port, pki[creds])
        assert bad.returncode == 1, (creds, bad.stdout, bad.stderr)
        assert WORD not in bad.stdout
        wait_until(lambda: f"pyvm: serial0: {text}" in vm.stderr(), 15, what=text)
    # a client speaking plain text gets nothing back and is dropped
    with socket.create_connection(("127.0.0.1", port), timeout=20) as plain:
        plain.sendall(WORD.encode() + b"\r")
        data = b""
        try:
            while chunk := plain.recv(4096):
                data += chunk
        except ConnectionResetError:
            pass
        assert WORD.encode() not in data
    # the guest kept running, and the right client is still served
    assert vm.status() == "running"
    again = _console(port, pki["client"])
    assert again.returncode == 0 and WORD in again.stdout, again.stderr
    assert "Traceback" not in vm.stderr()


def test_tls_serial_client_end(vms, pki, tmp_path: Path) -> None:
    """``server=off``: pyvm connects to a TLS server, checks its certificate against the
    host name and shows its own; the guest's output arrives encrypted."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki["server"] / "server-cert.pem"), str(pki["server"] / "server-key.pem"))
    ctx.load_verify_locations(str(pki["server"] / "ca-cert.pem"))
    ctx.verify_mode = ssl.CERT_REQUIRED
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    got: dict[str, object] = {}

    def serve() -> None:
        conn, _ = listener.accept()
        with ctx.wrap_socket(conn, server_side=True) as tls:
            got["peer"] = tls.getpeercert()
            data = b""
            tls.settimeout(30)
            while b"tick 1" not in data:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                data += chunk
            got["data"] = data
    thread = threading.Thread(target=serve)
    thread.start()
    try:
        vm = vms("tlsclient", *HELLO, "-serial", f"tcp:127.0.0.1:{port},tls-creds=tlsc",
                 "-object", f"tls-creds-x509,id=tlsc,dir={pki['client']},endpoint=client",
                 serial=False)
        thread.join(40)
        assert not thread.is_alive()
        assert b"pyvm hello" in got["data"]            # type: ignore[operator]
        assert got["peer"]
        assert vm.status() == "running"
    finally:
        listener.close()
        thread.join(5)


@pytest.mark.parametrize("spec, objects, text", [
    ("unix:{tmp}/s.sock,server=on,wait=off,tls-creds=tls0", "server",
     "TLS can only be used over TCP socket"),
    ("tcp:127.0.0.1:0,server=on,wait=off,tls-authz=a", "server",
     "'tls_authz' option requires 'tls_creds' option"),
    ("tcp:127.0.0.1:0,server=on,wait=off,tls-creds=nope", "server",
     "No TLS credentials with id 'nope'"),
    ("tcp:127.0.0.1:0,server=on,wait=off,tls-creds=tls0", "client",
     "Expected TLS credentials for a server endpoint"),
    ("tcp:127.0.0.1:0,server=on,wait=off,tls-creds=tls0,tls-authz=nope", "server",
     "No authorization object with id nope"),
])
def test_tls_serial_misconfigurations_give_qemus_texts(pki, tmp_path: Path, spec: str,
                                                       objects: str, text: str) -> None:
    registry = ObjectRegistry()
    registry.add(make_object("tls-creds-x509", {"id": "tls0", "dir": str(pki[objects]),
                                                "endpoint": objects}))
    value = spec.format(tmp=tmp_path)
    with pytest.raises(ConfigError) as err:
        parse_serial(value, "serial0", tls_objects=registry)
    assert str(err.value) == f"-serial {value}: {text}"
