"""TLS credential and authz objects: parsing, QEMU's texts, distinguished names."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyvm.tls import (AuthzList, AuthzSimple, ObjectRegistry, TlsCredsX509, TlsError,
                      distinguished_name, make_object)


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
    creds = make_object("tls-creds-x509", {"id": "t", "dir": str(tmp_path), "endpoint": "server"})
    assert isinstance(creds, TlsCredsX509) and creds.verify_peer
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
