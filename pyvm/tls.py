"""TLS credentials and authorization objects (``-object tls-creds-x509``, ``authz-simple``).

What QEMU offers (crypto/tlscredsx509.c, crypto/tlssession.c, authz/simple.c,
authz/list.c), rebuilt on Python's :mod:`ssl`:

``tls-creds-x509,id=ID,dir=DIR,endpoint=server|client,verify-peer=on|off``
    PEM files in DIR under QEMU's names: ``ca-cert.pem`` (always), ``server-cert.pem`` and
    ``server-key.pem`` (server), ``client-cert.pem`` and ``client-key.pem`` (client; needed
    when the server verifies its peers), ``ca-crl.pem`` (optional).  ``verify-peer``
    defaults to on: a server then demands a client certificate signed by the CA, a client
    checks the server's certificate and its host name.
``authz-simple,id=ID,identity=DN``
    Allows exactly one peer, named by the distinguished name of its certificate as
    GnuTLS prints it (RFC 4514 order, most specific first), e.g.
    ``CN=laptop.example.com,O=Example Org,L=London,ST=London,C=GB``.
``authz-list,id=ID,policy=deny|allow,rules.N.match=DN,rules.N.policy=allow|deny[,rules.N.format=exact|glob]``
    An ordered list of rules; the first match decides, else ``policy``.

``tls-creds-psk,id=ID,dir=DIR,endpoint=server|client[,username=NAME]``
    Pre-shared keys (crypto/tlscredspsk.c): ``DIR/keys.psk`` holds lines
    ``username:hexkey``; a client uses the key of ``username`` (default ``qemu``), a
    server looks the client's username up at each handshake.  Python 3.11's :mod:`ssl`
    has no TLS-PSK, so the sessions are OpenSSL's through pyOpenSSL
    (:mod:`pyvm.tls_psk`).

Objects are registered by id in an :class:`ObjectRegistry` that the machine owns; users
(the migration code) look them up by the id a parameter names.  Errors are
:class:`TlsError` with QEMU's texts.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import ssl
from dataclasses import dataclass, field
from typing import Any, Mapping, Union

from pyvm.errors import PyvmError

CA_CERT = "ca-cert.pem"
CA_CRL = "ca-crl.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"

TLS_OBJECT_TYPES = ("tls-creds-x509", "tls-creds-psk", "authz-simple", "authz-list")
# crypto/tlscredspsk.c (built without GnuTLS): QEMU's refusal when it cannot load TLS
# credentials of a kind (pyvm: when pyOpenSSL cannot be imported).
PSK_UNSUPPORTED = "TLS credentials support requires GNUTLS"
PSK_FILE = "keys.psk"
PSK_DEFAULT_USERNAME = "qemu"


class TlsError(PyvmError):
    """TLS credentials could not be loaded, or a peer was refused (QEMU's texts)."""


class TlsClosed(Exception):
    """The peer ended the TLS session (close_notify or EOF)."""


def _on_off(name: str, value: str) -> bool:
    if value in ("on", "yes", "true"):
        return True
    if value in ("off", "no", "false"):
        return False
    raise TlsError(f"Parameter '{name}' expects 'on' or 'off'")


@dataclass
class TlsCredsX509:
    """``tls-creds-x509``: a directory of PEM files for one endpoint."""

    id: str
    dir: str
    endpoint: str = "client"
    verify_peer: bool = True

    def _path(self, name: str, required: bool) -> str | None:
        # crypto/tlscreds.c qcrypto_tls_creds_get_path
        path = os.path.join(self.dir, name)
        if not os.access(path, os.R_OK):
            if required:
                err = os.strerror(2 if not os.path.exists(path) else 13)
                raise TlsError(f"Unable to access credentials {path}: {err}")
            return None
        return path

    def context(self) -> ssl.SSLContext:
        """A fresh SSL context for this endpoint (files are read now, as QEMU reloads)."""
        server = self.endpoint == "server"
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ca = self._path(CA_CERT, True)
        cert = self._path(SERVER_CERT if server else CLIENT_CERT, server)
        key = self._path(SERVER_KEY if server else CLIENT_KEY, server)
        try:
            ctx.load_verify_locations(cafile=ca)
            if cert and key:
                ctx.load_cert_chain(cert, key)
            crl = self._path(CA_CRL, False)
            if crl:
                ctx.load_verify_locations(cafile=crl)
                ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        except (ssl.SSLError, OSError) as err:
            raise TlsError(f"Unable to load credentials from {self.dir}: {err}") from err
        if server:
            ctx.verify_mode = ssl.CERT_REQUIRED if self.verify_peer else ssl.CERT_NONE
        else:
            # the host name is checked after the handshake with QEMU's text (tls_session.py)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_REQUIRED if self.verify_peer else ssl.CERT_NONE
        return ctx


def read_psk(path: str, username: str) -> bytes:
    """The key of ``username`` in a ``keys.psk`` file (crypto/tlscredspsk.c lookup_key)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            content = f.read()
    except OSError as err:
        raise TlsError(f"Cannot read PSK file {path}: {err.strerror}") from err
    for line in content.split("\n"):
        name, sep, key = line.partition(":")
        if sep and name == username:
            try:
                return bytes.fromhex(key.strip())
            except ValueError:
                raise TlsError(f"Username {username} has no hexadecimal key in PSK file "
                               f"{path}") from None
    raise TlsError(f"Username {username} not found in PSK file {path}")


@dataclass
class TlsCredsPsk:
    """``tls-creds-psk``: a ``keys.psk`` file for one endpoint."""

    id: str
    dir: str
    endpoint: str = "client"
    username: str | None = None
    verify_peer: bool = False           # no certificates: nothing to verify

    @property
    def psk_file(self) -> str:
        return os.path.join(self.dir, PSK_FILE)

    def load(self) -> None:
        """The checks QEMU makes when the object is created (qcrypto_tls_creds_psk_load)."""
        if self.endpoint == "server":
            if self.username is not None:
                raise TlsError("username should not be set when endpoint=server")
            _check_access(self.psk_file)
        else:
            _check_access(self.psk_file)
            self.client_key()

    def client_key(self) -> tuple[str, bytes]:
        username = self.username if self.username is not None else PSK_DEFAULT_USERNAME
        return username, read_psk(self.psk_file, username)


def _check_access(path: str) -> None:
    # crypto/tlscreds.c qcrypto_tls_creds_get_path
    if not os.access(path, os.R_OK):
        err = os.strerror(2 if not os.path.exists(path) else 13)
        raise TlsError(f"Unable to access credentials {path}: {err}")


@dataclass
class AuthzSimple:
    """``authz-simple``: one allowed identity (authz/simple.c)."""

    id: str
    identity: str

    def is_allowed(self, identity: str) -> bool:
        return identity == self.identity


@dataclass
class AuthzRule:
    match: str
    allow: bool
    glob: bool = False


@dataclass
class AuthzList:
    """``authz-list``: ordered rules, first match wins, else the default policy
    (authz/list.c)."""

    id: str
    allow_by_default: bool = False
    rules: list[AuthzRule] = field(default_factory=list)

    def is_allowed(self, identity: str) -> bool:
        for rule in self.rules:
            if (fnmatch.fnmatchcase(identity, rule.match) if rule.glob else identity == rule.match):
                return rule.allow
        return self.allow_by_default


TlsObject = Union[TlsCredsX509, TlsCredsPsk, AuthzSimple, AuthzList]
#: credentials a ``tls-creds`` parameter may name
TlsCreds = Union[TlsCredsX509, TlsCredsPsk]


def _policy(name: str, value: str) -> bool:
    if value not in ("allow", "deny"):
        raise TlsError(f"Parameter '{name}' does not accept value '{value}'")
    return value == "allow"


def make_object(qom_type: str, props: Mapping[str, str]) -> TlsObject:
    """Build one object from its ``-object`` properties (``id`` included)."""
    ident = props["id"]
    if qom_type == "tls-creds-x509":
        allowed = {"id", "dir", "endpoint", "verify-peer", "sanity-check", "priority", "passwordid"}
        _check_props(qom_type, props, allowed)
        if "dir" not in props:
            raise TlsError("Parameter 'dir' is missing")
        endpoint = props.get("endpoint", "client")
        if endpoint not in ("client", "server"):
            raise TlsError(f"Parameter 'endpoint' does not accept value '{endpoint}'")
        x509 = TlsCredsX509(ident, props["dir"], endpoint,
                            _on_off("verify-peer", props.get("verify-peer", "on")))
        x509.context()      # as QEMU, the files are checked and read when the object is made
        return x509
    if qom_type == "tls-creds-psk":
        _check_props(qom_type, props, {"id", "dir", "endpoint", "verify-peer", "username",
                                       "priority", "sanity-check"})
        endpoint = props.get("endpoint", "client")
        if endpoint not in ("client", "server"):
            raise TlsError(f"Parameter 'endpoint' does not accept value '{endpoint}'")
        _on_off("verify-peer", props.get("verify-peer", "on"))
        if "dir" not in props:
            raise TlsError("Parameter 'dir' is missing")
        if importlib.util.find_spec("OpenSSL") is None:     # pyvm/tls_psk.py needs it
            raise TlsError(PSK_UNSUPPORTED)
        psk = TlsCredsPsk(ident, props["dir"], endpoint, props.get("username"))
        psk.load()
        return psk
    if qom_type == "authz-simple":
        _check_props(qom_type, props, {"id", "identity"})
        if "identity" not in props:
            raise TlsError("The 'identity' property must be set")
        return AuthzSimple(ident, props["identity"])
    # authz-list: rules.N.match / rules.N.policy / rules.N.format
    rules: dict[int, dict[str, str]] = {}
    for key, value in props.items():
        if key in ("id", "policy"):
            continue
        parts = key.split(".")
        if len(parts) != 3 or parts[0] != "rules" or not parts[1].isdigit() \
                or parts[2] not in ("match", "policy", "format"):
            raise TlsError(f"Property '{qom_type}.{key}' not found")
        rules.setdefault(int(parts[1]), {})[parts[2]] = value
    out = AuthzList(ident, _policy("policy", props.get("policy", "deny")))
    for n in sorted(rules):
        r = rules[n]
        if "match" not in r:
            raise TlsError(f"Parameter 'rules.{n}.match' is missing")
        fmt = r.get("format", "exact")
        if fmt not in ("exact", "glob"):
            raise TlsError(f"Parameter 'rules.{n}.format' does not accept value '{fmt}'")
        out.rules.append(AuthzRule(r["match"], _policy(f"rules.{n}.policy", r.get("policy", "deny")),
                                   fmt == "glob"))
    return out


def _check_props(qom_type: str, props: Mapping[str, str], allowed: set[str]) -> None:
    for key in props:
        if key not in allowed:
            raise TlsError(f"Property '{qom_type}.{key}' not found")


class ObjectRegistry:
    """The machine's TLS and authz objects by id (QEMU's /objects container)."""

    def __init__(self) -> None:
        self._objects: dict[str, TlsObject] = {}

    def add(self, obj: TlsObject) -> None:
        if obj.id in self._objects:
            raise TlsError(f"attempt to add duplicate property '{obj.id}' to object")
        self._objects[obj.id] = obj

    def get(self, ident: str) -> TlsObject | None:
        return self._objects.get(ident)

    def creds(self, ident: str, endpoint: str) -> TlsCreds:
        """The credentials a ``tls-creds`` parameter names (migration/tls.c texts)."""
        obj = self._objects.get(ident)
        if obj is None:
            raise TlsError(f"No TLS credentials with id '{ident}'")
        if not isinstance(obj, (TlsCredsX509, TlsCredsPsk)):
            raise TlsError(f"Object with id '{ident}' is not TLS credentials")
        if obj.endpoint != endpoint:
            raise TlsError(f"Expected TLS credentials for a {endpoint} endpoint")
        return obj

    def authz(self, ident: str) -> AuthzSimple | AuthzList:
        obj = self._objects.get(ident)
        if not isinstance(obj, (AuthzSimple, AuthzList)):
            # authz/base.c qauthz_is_allowed_by_id
            raise TlsError(f"No authorization object with id {ident}")
        return obj


# -- the peer's distinguished name, as GnuTLS prints it ------------------------------------------

_SHORT_NAMES = {
    "commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
    "localityName": "L", "stateOrProvinceName": "ST", "countryName": "C",
    "emailAddress": "EMAIL", "domainComponent": "DC", "serialNumber": "serialNumber",
}


def _escape_dn_value(value: str) -> str:
    # RFC 4514 section 2.4
    out = []
    for i, c in enumerate(value):
        if c in ',+"\\<>;' or (i == 0 and c in "# ") or (i == len(value) - 1 and c == " "):
            out.append("\\" + c)
        else:
            out.append(c)
    return "".join(out)


def distinguished_name(peercert: Mapping[str, Any]) -> str:
    """RFC 4514 string of ``ssl.SSLSocket.getpeercert()['subject']``: the RDNs in reverse
    order of the certificate, ``+`` inside a multi-valued RDN (gnutls_x509_crt_get_dn)."""
    rdns = []
    for rdn in reversed(peercert.get("subject", ())):
        rdns.append("+".join(f"{_SHORT_NAMES.get(k, k)}={_escape_dn_value(v)}" for k, v in rdn))
    return ",".join(rdns)


# -- handshake failures in GnuTLS's words (crypto/tlssession.c) ---------------------------------

# OpenSSL X509_V_ERR_* codes (include/openssl/x509_vfy.h) and GnuTLS's wording for them
_VERIFY_TEXTS = {
    9: "The certificate is not yet activated",
    10: "The certificate has expired",
    18: "The certificate hasn't got a known issuer",
    19: "The certificate hasn't got a known issuer",
    20: "The certificate hasn't got a known issuer",
    21: "The certificate hasn't got a known issuer",
    23: "The certificate has been revoked",
}
_X509_V_ERR_HOSTNAME_MISMATCH = 62


def handshake_error(err: ssl.SSLError, hostname: str | None) -> TlsError:
    """The TlsError (QEMU's text) for a failed handshake."""
    if isinstance(err, ssl.SSLCertVerificationError):
        if err.verify_code == _X509_V_ERR_HOSTNAME_MISMATCH:
            return TlsError(f"Certificate does not match the hostname {hostname}")
        return TlsError(_VERIFY_TEXTS.get(err.verify_code, "The certificate is not trusted"))
    reason = err.reason or str(err)
    if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in reason.upper().replace(" ", "_"):
        return TlsError("No certificate peers")
    return TlsError(f"TLS handshake failed: {reason}")
