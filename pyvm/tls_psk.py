"""TLS sessions with pre-shared keys (``tls-creds-psk``), on OpenSSL through pyOpenSSL.

Python 3.11's :mod:`ssl` has no TLS-PSK, and pyOpenSSL's ``Context`` offers no PSK
methods either; the OpenSSL calls are reached through the cffi binding pyOpenSSL is built
on (``cryptography.hazmat.bindings.openssl``, which exports
``SSL_CTX_set_psk_server_callback`` and ``SSL_CTX_set_psk_client_callback``, see
OpenSSL's SSL_CTX_use_psk_identity_hint(3) and SSL_CTX_set_psk_client_callback(3)).

QEMU's semantics (crypto/tlscredspsk.c): a client sends its username (``username=``,
default ``qemu``) and the key of that username in ``DIR/keys.psk``; a server reads
``keys.psk`` at each handshake and uses the key of the username the client sent; an
unknown username, or a different key, fails the handshake.  The session is TLS 1.2 with
(EC)DHE-PSK or PSK cipher suites, the key-exchange families QEMU's GnuTLS priority
``+ECDHE-PSK:+DHE-PSK:+PSK`` allows.

:class:`PskEngine` is a sans-IO :class:`pyvm.tls_pump.TlsEngine` over memory BIOs.  The
callbacks are guarded: an exception inside one refuses the handshake (returns 0) and is
kept for the error text, never raised through OpenSSL.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL

from pyvm.tls import TlsClosed, TlsCredsPsk, TlsError, read_psk

_ffi: Any = Binding.ffi
_lib: Any = Binding.lib

CIPHERS = b"ECDHE-PSK:DHE-PSK:PSK"
READ_CHUNK = 1 << 16
#: PSK_MAX_IDENTITY_LEN / PSK_MAX_PSK_LEN, include/openssl/ssl.h
MAX_IDENTITY = 128
MAX_PSK = 512


def available() -> bool:
    """Whether this OpenSSL build has PSK (cryptography's ``Cryptography_HAS_PSK``)."""
    return bool(getattr(_lib, "Cryptography_HAS_PSK", 0))


class PskEngine:
    """One TLS-PSK session (client or server) fed and drained through memory BIOs."""

    kind = "PSK"            # in QEMU's authz refusal text

    def __init__(self, creds: TlsCredsPsk, server_side: bool) -> None:
        if not available():
            raise TlsError("TLS credentials support requires GNUTLS")
        self.creds = creds
        self.server_side = server_side
        self.username: str | None = None       # the client's username, once known
        self._problem: str | None = None
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_cipher_list(CIPHERS)
        if server_side:
            self._callback = _ffi.callback(
                "unsigned int(SSL *, const char *, unsigned char *, unsigned int)",
                self._server_key)
            _lib.SSL_CTX_set_psk_server_callback(ctx._context, self._callback)
        else:
            self.username, self._key = creds.client_key()
            self._callback = _ffi.callback(
                "unsigned int(SSL *, const char *, char *, unsigned int, unsigned char *,"
                " unsigned int)", self._client_key)
            _lib.SSL_CTX_set_psk_client_callback(ctx._context, self._callback)
        self._ctx = ctx                        # keeps the context and its callback alive
        self._conn = SSL.Connection(ctx, None)
        if server_side:
            self._conn.set_accept_state()
        else:
            self._conn.set_connect_state()

    # -- OpenSSL's callbacks (guarded) --------------------------------------------------------
    def _server_key(self, _ssl: Any, identity: Any, psk: Any, max_len: int) -> int:
        try:
            name = _ffi.string(identity).decode("utf-8", "replace") if identity else ""
            key = read_psk(self.creds.psk_file, name)
            if not key or len(key) > max_len:
                raise TlsError(f"PSK of {name} does not fit")
            _ffi.memmove(psk, key, len(key))
            self.username = name
            return len(key)
        except Exception as err:  # noqa: BLE001 - never through OpenSSL: refuse instead
            self._problem = str(err)
            return 0

    def _client_key(self, _ssl: Any, _hint: Any, identity: Any, max_identity: int,
                    psk: Any, max_psk: int) -> int:
        try:
            name = (self.username or "").encode()
            if len(name) + 1 > max_identity or len(self._key) > max_psk or not self._key:
                raise TlsError("the PSK username or key is too long")
            _ffi.memmove(identity, name + b"\0", len(name) + 1)
            _ffi.memmove(psk, self._key, len(self._key))
            return len(self._key)
        except Exception as err:  # noqa: BLE001 - never through OpenSSL: refuse instead
            self._problem = str(err)
            return 0

    # -- TlsEngine -------------------------------------------------------------------------------
    def do_handshake(self) -> bool:
        try:
            self._conn.do_handshake()
            return True
        except SSL.WantReadError:
            return False
        except SSL.Error as err:
            reason = self._problem or _reason(err)
            raise TlsError(f"TLS handshake failed: {reason}") from err

    def feed(self, data: bytes) -> None:
        self._conn.bio_write(data)

    def feed_eof(self) -> None:
        self._conn.bio_shutdown()

    def read(self) -> bytes:
        parts: list[bytes] = []
        while True:
            try:
                chunk = self._conn.recv(READ_CHUNK)
            except SSL.WantReadError:
                break
            except (SSL.ZeroReturnError, SSL.SysCallError) as err:
                if parts:
                    break
                raise TlsClosed() from err
            except SSL.Error as err:
                raise TlsError(f"TLS read failed: {_reason(err)}") from err
            if not chunk:
                break
            parts.append(chunk)
        return b"".join(parts)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self._conn.send(bytes(view[:READ_CHUNK]))
            view = view[n:]

    def close(self) -> None:
        try:
            self._conn.shutdown()
        except SSL.Error:
            pass

    def take_output(self) -> bytes:
        out: list[bytes] = []
        while True:
            try:
                out.append(self._conn.bio_read(READ_CHUNK))
            except SSL.WantReadError:
                break
        return b"".join(out)

    def peer_name(self) -> str | None:
        """The client's PSK username on a server (what QEMU's authz checks for PSK)."""
        return self.username if self.server_side else None


def _reason(err: Exception) -> str:
    if isinstance(err, SSL.SysCallError):
        return "the peer closed the connection"
    args = err.args[0] if err.args else None
    if isinstance(args, list) and args and isinstance(args[-1], tuple):
        return str(args[-1][-1])
    return str(err) or type(err).__name__


__all__ = ["PskEngine", "available"]
