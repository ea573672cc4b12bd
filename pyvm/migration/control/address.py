"""Where a migration goes: ``uri`` strings and ``channels`` lists as one typed address.

``migrate`` and ``migrate-incoming`` name their peer either with a URI (``tcp:HOST:PORT``,
``unix:PATH``, ``vsock:CID:PORT``, ``fd:NAME``, ``exec:CMDLINE``, ``rdma:HOST:PORT``,
``file:PATH[,offset=N]``) or, since QEMU 8.2, with a one-element ``channels`` list of
QAPI ``MigrationChannel`` objects.  Both become a :class:`MigrationAddress`, mirroring
QAPI's ``MigrationAddress`` union on ``transport``; socket addresses mirror
``SocketAddress``, the union on ``type``.  Parsing follows QEMU 8.2
(migration/migration.c ``migrate_uri_parse``, util/qemu-sockets.c ``socket_parse`` and
``inet_parse``, migration/file.c ``file_parse_offset``, util/cutils.c ``qemu_strtosz``)
and reports QEMU's texts as :class:`AddressError`.

Pure data: nothing here opens a socket or a file.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Mapping, Sequence

from pyvm.migration.errors import MigrationError


class AddressError(MigrationError):
    """A ``uri`` or ``channels`` argument was refused (QEMU's text)."""


# migration.c migration_channels_and_transport_compatible


# -- SocketAddress (qapi/sockets.json, flat union on "type") ---------------------------------

def _qapi_members(obj: Any) -> dict[str, Any]:
    """A dataclass's set members under their QAPI names (``keep_alive`` -> ``keep-alive``)."""
    out: dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if value is not None:
            out[f.metadata.get("qapi", f.name.replace("_", "-"))] = (
                list(value) if isinstance(value, tuple) else value)
    return out


@dataclass(frozen=True)
class SocketAddress:
    """Base of the ``SocketAddress`` variants; ``to_qapi()`` gives the flat JSON object."""

    type: ClassVar[str] = ""

    def to_qapi(self) -> dict[str, Any]:
        return {"type": self.type, **_qapi_members(self)}


@dataclass(frozen=True)
class InetSocketAddress(SocketAddress):
    """``inet``: host and port are strings, as in QAPI; unset options are ``None``."""

    type: ClassVar[str] = "inet"
    host: str
    port: str
    numeric: bool | None = None
    to: int | None = None
    ipv4: bool | None = None
    ipv6: bool | None = None
    keep_alive: bool | None = None
    mptcp: bool | None = None


_INET_OPTIONS = ("numeric", "to", "ipv4", "ipv6", "keep-alive", "mptcp")


@dataclass(frozen=True)
class UnixSocketAddress(SocketAddress):
    type: ClassVar[str] = "unix"
    path: str
    abstract: bool | None = None
    tight: bool | None = None


@dataclass(frozen=True)
class VsockSocketAddress(SocketAddress):
    type: ClassVar[str] = "vsock"
    cid: str
    port: str


@dataclass(frozen=True)
class FdSocketAddress(SocketAddress):
    """``fd``: a decimal descriptor number or a name registered with ``getfd``."""

    type: ClassVar[str] = "fd"
    name: str = field(metadata={"qapi": "str"})


# -- MigrationAddress (qapi/migration.json 8.2, flat union on "transport") -------------------

@dataclass(frozen=True)
class MigrationAddress:
    """Base of the four transports; ``to_qapi()`` gives the flat JSON object."""

    transport: ClassVar[str] = ""

    def to_qapi(self) -> dict[str, Any]:
        return {"transport": self.transport, **_qapi_members(self)}


@dataclass(frozen=True)
class SocketMigrationAddress(MigrationAddress):
    transport: ClassVar[str] = "socket"
    socket: SocketAddress

    def to_qapi(self) -> dict[str, Any]:
        return {"transport": "socket", **self.socket.to_qapi()}


@dataclass(frozen=True)
class ExecMigrationAddress(MigrationAddress):
    """The command's argv, run without a shell (``exec:CMD`` is ``/bin/sh -c CMD``)."""

    transport: ClassVar[str] = "exec"
    args: tuple[str, ...]


@dataclass(frozen=True)
class RdmaMigrationAddress(MigrationAddress):
    transport: ClassVar[str] = "rdma"
    inet: InetSocketAddress

    def to_qapi(self) -> dict[str, Any]:
        return {"transport": "rdma", **_qapi_members(self.inet)}


@dataclass(frozen=True)
class FileMigrationAddress(MigrationAddress):
    """The stream starts ``offset`` bytes into ``filename``."""

    transport: ClassVar[str] = "file"
    filename: str
    offset: int = 0


# -- inet_parse / socket_parse (util/qemu-sockets.c) -----------------------------------------

def _scan(text: str, start: int, width: int, stop: str) -> tuple[str, int] | None:
    """sscanf ``%<width>[^<stop>]``: 1..width characters outside ``stop``, or None."""
    end = start
    while end < len(text) and end - start < width and text[end] not in stop:
        end += 1
    return (text[start:end], end) if end > start else None


def _parse_flag(flag: str, optstr: str) -> bool:
    """inet_parse_flag: ``,flag``, ``,flag=on`` or ``,flag=off``."""
    comma = optstr.find(",")
    if comma >= 0 and optstr[comma + 1:comma + 2] == ",":
        raise AddressError(f"error parsing '{flag}' flag '{optstr}'")
    value = optstr[:comma] if comma >= 0 else optstr
    if value in ("", "=on"):
        return True
    if value == "=off":
        return False
    raise AddressError(f"error parsing '{flag}' flag '{optstr}'")


_TO_RE = re.compile(r"[ \t\n\v\f\r]*[+-]?[0-9]+")


def parse_inet(text: str) -> InetSocketAddress:
    """``HOST:PORT``, ``[V6HOST]:PORT`` or ``:PORT``, then ``,to=N,ipv4,ipv6,...``."""
    host = ""
    if text.startswith(":"):
        port_scan = _scan(text, 1, 32, ",")
        if port_scan is None:
            raise AddressError(f"error parsing port in address '{text}'")
        port, pos = port_scan
    else:
        v6 = text.startswith("[")
        host_scan = _scan(text, 1 if v6 else 0, 64, "]" if v6 else ":")
        sep = "]:" if v6 else ":"
        port_scan = None
        if host_scan is not None and text.startswith(sep, host_scan[1]):
            port_scan = _scan(text, host_scan[1] + len(sep), 32, ",")
        if host_scan is None or port_scan is None:
            what = "IPv6 address" if v6 else "address"
            raise AddressError(f"error parsing {what} '{text}'")
        host, (port, pos) = host_scan[0], port_scan
    optstr = text[pos:]
    options: dict[str, Any] = {}
    at = optstr.find(",to=")
    if at >= 0:
        match = _TO_RE.match(optstr, at + 4)
        if match is None or optstr[match.end():match.end() + 1] not in ("", ","):
            raise AddressError("error parsing to= argument")
        options["to"] = int(match.group()) & 0xFFFF        # stored into a uint16
    for flag, attr in (("ipv4", "ipv4"), ("ipv6", "ipv6"), ("keep-alive", "keep_alive"),
                       ("mptcp", "mptcp")):
        at = optstr.find("," + flag)
        if at >= 0:
            options[attr] = _parse_flag(flag, optstr[at + 1 + len(flag):])
    return InetSocketAddress(host, port, **options)


def _parse_vsock(text: str) -> VsockSocketAddress:
    cid = _scan(text, 0, 32, ":")
    port = _scan(text, cid[1] + 1, 32, ",") if cid and text.startswith(":", cid[1]) else None
    if cid is None or port is None:
        raise AddressError(f"error parsing address '{text}'")
    if port[1] != len(text):
        raise AddressError(f"trailing characters in address '{text}'")
    return VsockSocketAddress(cid[0], port[0])


def parse_socket(text: str) -> SocketAddress:
    """socket_parse: ``unix:``, ``fd:``, ``vsock:``, ``tcp:`` or a bare inet address."""
    if text.startswith("unix:"):
        if not text[5:]:
            raise AddressError("invalid Unix socket address")
        return UnixSocketAddress(text[5:])
    if text.startswith("fd:"):
        if not text[3:]:
            raise AddressError("invalid file descriptor address")
        return FdSocketAddress(text[3:])
    if text.startswith("vsock:"):
        return _parse_vsock(text[6:])
    return parse_inet(text[4:] if text.startswith("tcp:") else text)


# -- qemu_strtosz (util/cutils.c, 8.2): the file offset -------------------------------------

_SUFFIX_SHIFT = {"B": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}
_UINT_RE = re.compile(r"[ \t\n\v\f\r]*([+-]?)([0-9]+)")
_HEX_RE = re.compile(r"[ \t\n\v\f\r]*[+-]?0[xX]([0-9a-fA-F]+)")
_FRACTION_RE = re.compile(r"[ \t\n\v\f\r]*([+-]?)([0-9]+\.?[0-9]*|\.[0-9]+)")
_DIGITS = "0123456789"


def parse_offset(text: str) -> int:
    """A size as ``qemu_strtosz`` reads it: decimal with an optional fraction and a
    B/K/M/G/T/P/E suffix (powers of 1024), or ``0x`` hex without a suffix.

    Raises ``OSError(errno, ...)`` with ``EINVAL`` for malformed text and ``ERANGE`` for
    negative or too large values, the two errors QEMU reports.  As in QEMU, text left
    over after the number turns any error into ``EINVAL``.
    """
    value, pos, code = _scan_size(text)
    if pos != len(text):
        code = errno.EINVAL
    if code:
        raise OSError(code, os.strerror(code))
    return value


def _scan_size(text: str) -> tuple[int, int, int]:
    """(value, end position, errno or 0) for :func:`parse_offset` (util/cutils.c do_strtosz)."""
    m = _UINT_RE.match(text)
    pos, value, fraction = 0, 0, 0
    if m:
        value, pos = int(m.group(2)), m.end()
        if m.group(1) == "-" or value >> 64:
            return 0, pos, errno.ERANGE        # parse_uint refuses negatives
    if m and value == 0 and text[pos:pos + 1] in ("x", "X"):
        h = _HEX_RE.match(text)
        if h is None:
            return 0, pos, errno.EINVAL
        value, pos = int(h.group(1), 16), h.end()
        rest = text[pos:pos + 1]
        if rest == "." or (rest and rest.upper() in _SUFFIX_SHIFT):
            return 0, 0, errno.EINVAL          # hex takes neither fraction nor suffix
        if value >> 64:
            return 0, pos, errno.ERANGE
        return value, pos, 0
    if text[pos:pos + 1] == "." or (m is None and "." in text):
        after = text[pos + 1:pos + 2]
        if m and not (after and after in _DIGITS):
            pos += 1                              # "1." or "1.k": no fractional digits
        else:
            copy = re.split("[eE]", text[pos:], maxsplit=1)[0]   # no exponents
            f = _FRACTION_RE.match(copy)
            if f is None:
                return 0, 0, errno.EINVAL
            pos += f.end()
            if f.group(1) == "-":
                return 0, pos, errno.ERANGE
            frac = float(f.group(2))
            if frac >= 1.0:
                value += int(frac)
            else:
                fraction = int(frac * 2.0 ** 64) or (1 if frac > 0 else 0)
    elif m is None:
        return 0, 0, errno.EINVAL
    suffix = text[pos:pos + 1].upper()
    shift = _SUFFIX_SHIFT.get(suffix) if suffix else None
    if shift is None:
        shift = 0
    else:
        pos += 1
    if shift == 0 and fraction:
        return 0, 0, errno.EINVAL              # a fraction needs a scale
    product = fraction << shift
    total = (value << shift) + (product >> 64) + ((product >> 63) & 1)   # round half up
    if total >> 64:
        return 0, pos, errno.ERANGE
    return total, pos, 0


# -- the URI (migration.c migrate_uri_parse, 8.2) --------------------------------------------

def parse_uri(uri: str) -> MigrationAddress:
    """Parse a ``migrate``/``migrate-incoming`` URI."""
    if uri.startswith("exec:"):
        return ExecMigrationAddress(("/bin/sh", "-c", uri[5:]))
    if uri.startswith("rdma:"):
        return RdmaMigrationAddress(parse_inet(uri[5:]))
    if uri.startswith(("tcp:", "unix:", "vsock:", "fd:")):
        return SocketMigrationAddress(parse_socket(uri))
    if uri.startswith("file:"):
        spec = uri[5:]
        at = spec.find(",offset=")
        if at < 0:
            return FileMigrationAddress(spec)
        option = spec[at + len(",offset="):]
        try:
            offset = parse_offset(option)
        except OSError as err:
            raise AddressError(f"file URI has bad offset {option}: {err.strerror}") from None
        return FileMigrationAddress(spec[:at], offset)
    raise AddressError(f"unknown migration protocol: {uri}")


# -- channels (already checked against the QAPI schema) --------------------------------------

def _member(obj: Mapping[str, Any], name: str, path: str, kind: type = str) -> Any:
    if name not in obj:
        raise AddressError(f"Parameter '{path}.{name}' is missing")
    value = obj[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        expected = {str: "string", int: "integer", list: "array"}[kind]
        raise AddressError(f"Invalid parameter type for '{path}.{name}', expected: {expected}")
    return value


def _inet_from_qapi(obj: Mapping[str, Any], path: str) -> InetSocketAddress:
    options = {flag.replace("-", "_"): obj[flag] for flag in _INET_OPTIONS if flag in obj}
    return InetSocketAddress(_member(obj, "host", path), _member(obj, "port", path), **options)


def socket_address_from_qapi(obj: Mapping[str, Any], path: str = "addr") -> SocketAddress:
    """A ``SocketAddress`` JSON object (flat, ``type`` tag) as a typed address."""
    kind = _member(obj, "type", path)
    if kind == "inet":
        return _inet_from_qapi(obj, path)
    if kind == "unix":
        return UnixSocketAddress(_member(obj, "path", path), obj.get("abstract"), obj.get("tight"))
    if kind == "vsock":
        return VsockSocketAddress(_member(obj, "cid", path), _member(obj, "port", path))
    if kind == "fd":
        return FdSocketAddress(_member(obj, "str", path))
    raise AddressError(f"Parameter 'type' does not accept value '{kind}'")


def address_from_qapi(obj: Mapping[str, Any], path: str = "addr") -> MigrationAddress:
    """A ``MigrationAddress`` JSON object (flat, ``transport`` tag) as a typed address."""
    transport = _member(obj, "transport", path)
    if transport == "socket":
        return SocketMigrationAddress(socket_address_from_qapi(obj, path))
    if transport == "exec":
        return ExecMigrationAddress(tuple(_member(obj, "args", path, list)))
    if transport == "rdma":
        return RdmaMigrationAddress(_inet_from_qapi(obj, path))
    if transport == "file":
        return FileMigrationAddress(_member(obj, "filename", path),
                                    _member(obj, "offset", path, int))
    raise AddressError(f"Parameter 'transport' does not accept value '{transport}'")


def resolve_address(uri: str | None, channels: Sequence[Mapping[str, Any]] | None,
                    command: str = "migrate") -> MigrationAddress:
    """The address of ``migrate`` or ``migrate-incoming`` (``command``) from its arguments.

    ``None`` means the argument was absent; an empty ``channels`` list counts as given for
    the mutual-exclusion check but not as an address, as in QEMU 8.2.
    """
    if uri is not None and channels is not None:
        raise AddressError("'uri' and 'channels' arguments are mutually exclusive; exactly one "
                           f"of the two should be present in '{command}' qmp command ")
    if channels:
        if len(channels) > 1:
            raise AddressError("Channel list has more than one entries")
        channel = channels[0]
        kind = _member(channel, "channel-type", "channels[0]")
        if kind != "main":
            raise AddressError(f"Parameter 'channel-type' does not accept value '{kind}'")
        addr = channel.get("addr")
        if not isinstance(addr, Mapping):
            raise AddressError("Parameter 'channels[0].addr' is missing")
        return address_from_qapi(addr, "channels[0].addr")
    if uri is not None:
        return parse_uri(uri)
    raise AddressError("neither 'uri' or 'channels' argument are specified in "
                       f"'{command}' qmp command ")
