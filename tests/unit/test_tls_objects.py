"""TLS credential and authz objects: parsing, QEMU's texts, distinguished names."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvm.tls import (AuthzList, AuthzSimple, ObjectRegistry, TlsCredsPsk, TlsCredsX509,
                      TlsError, distinguished_name, make_object)


def test_distinguished_name_is_gnutls_order_and_escaped() -> None:
    cert = {"subject": ((("countryName", "GB"),), (("organizationName", "Example, Inc"),),
                        (("commonName", "host"), ("emailAddress", "a@b")))}
    assert distinguished_name(cert) == "CN=host+EMAIL=a@b,O=Example\\, Inc,C=GB"


def test_authz_simple_and_list() -> None:
    simple = make_object("authz-simple", {"id": "a", "identity": "CN=x"})
    assert isinstance(simple, AuthzSimple)
    assert simple.is_allowed("CN=x") and not simple.is_allowed("CN=y")
    lst = make_object("authz-list", {"id": "l", "policy": "allow",
                                     "rules.0.match": "CN=bad*", "rules.0.policy": "deny",
                                     "rules.0.format": "glob"})
    assert isinstance(lst, AuthzList)
    assert not lst.is_allowed("CN=bad.example") and lst.is_allowed("CN=good")
    with pytest.raises(TlsError, match="The 'identity' property must be set"):
        make_object("authz-simple", {"id": "a"})
    with pytest.raises(TlsError, match="Property 'authz-list.rules.x' not found"):
        make_object("authz-list", {"id": "l", "rules.x": "1"})


def test_creds_parsing_and_registry_texts(tmp_path: Path) -> None:
    # crypto/tlscredsx509.c: the files are looked for when the object is created
    with pytest.raises(TlsError, match=f"Unable to access credentials {tmp_path}/ca-cert.pem: "
                                       "No such file or directory"):
        make_object("tls-creds-x509", {"id": "t", "dir": str(tmp_path), "endpoint": "server"})
    creds = TlsCredsX509("t", str(tmp_path), "server")
    reg = ObjectRegistry()
    reg.add(creds)
    with pytest.raises(TlsError, match="attempt to add duplicate property 't' to object"):
        reg.add(creds)
    with pytest.raises(TlsError, match="No TLS credentials with id 'nope'"):
        reg.creds("nope", "server")
    with pytest.raises(TlsError, match="Expected TLS credentials for a client endpoint"):
        reg.creds("t", "client")
    with pytest.raises(TlsError, match="No authorization object with id t"):
        reg.authz("t")
    with pytest.raises(TlsError, match=f"Unable to access credentials {tmp_path}/ca-cert.pem: "
                                       "No such file or directory"):
        creds.context()
    with pytest.raises(TlsError, match="Parameter 'endpoint' does not accept value 'both'"):
        make_object("tls-creds-x509", {"id": "t", "dir": "d", "endpoint": "both"})


def test_tls_creds_psk_checks_properties_and_keys_with_qemus_texts(tmp_path: Path) -> None:
    (tmp_path / "keys.psk").write_text("alice:" + "cd" * 16 + "\nqemu:" + "ab" * 32 + "\n")
    props = {"id": "p", "dir": str(tmp_path), "endpoint": "server", "username": "qemu"}
    with pytest.raises(TlsError, match="^username should not be set when endpoint=server$"):
        make_object("tls-creds-psk", props)
    with pytest.raises(TlsError, match="Property 'tls-creds-psk.bogus' not found"):
        make_object("tls-creds-psk", {**props, "bogus": "1"})
    with pytest.raises(TlsError, match="Parameter 'endpoint' does not accept value 'both'"):
        make_object("tls-creds-psk", {**props, "endpoint": "both"})
    client = make_object("tls-creds-psk", {**props, "endpoint": "client"})
    assert isinstance(client, TlsCredsPsk)
    assert client.client_key() == ("qemu", bytes.fromhex("ab" * 32))
    alice = make_object("tls-creds-psk", {**props, "endpoint": "client", "username": "alice"})
    assert isinstance(alice, TlsCredsPsk) and alice.client_key()[1] == b"\xcd" * 16
    with pytest.raises(TlsError, match=f"^Username bob not found in PSK file {tmp_path}/keys.psk$"):
        make_object("tls-creds-psk", {**props, "endpoint": "client", "username": "bob"})


def test_tls_creds_psk_without_keys_file_is_one_line_and_exit_1(tmp_path: Path) -> None:
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "pyvm", "-display", "none", "-object",
                           f"tls-creds-psk,id=p,dir={tmp_path},endpoint=client"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr == (f"pyvm: -object tls-creds-psk,id=p,dir={tmp_path},endpoint=client: "
                           f"Unable to access credentials {tmp_path}/keys.psk: "
                           "No such file or directory\n")
