"""Monitor options of the command line: ``-qmp``, ``-monitor``, ``-chardev`` + ``-mon``.

Accepted forms (QEMU's)::

    -qmp unix:PATH,server=on,wait=off        -qmp tcp:[HOST]:PORT,server=on,wait=off
    -qmp stdio                               -monitor stdio        (human monitor)
    -chardev socket,id=ID,path=PATH,server=on,wait=off
    -chardev socket,id=ID,host=HOST,port=PORT,server=on,wait=off
    -chardev stdio,id=ID
    -mon chardev=ID[,mode=control|readline][,pretty=on|off]

A tcp monitor takes ``tls-creds=ID`` (a ``tls-creds-x509`` object with
``endpoint=server``) and ``tls-authz=ID``: clients then speak TLS, and with
``verify-peer=on`` must show a certificate the CA signed (and the authz object allows).
``-monitor`` takes the same endpoint forms as ``-qmp`` and gives a human monitor.  A tcp
monitor without a host binds 127.0.0.1 only.  Monitors always listen (``server=on``);
``wait=on`` -- in QEMU, wait for a client before starting the guest -- is accepted and
treated as ``wait=off``.  ``-chardev`` entries that no ``-mon`` names are left to their
other users (serial ports) and not checked here.  Every error is one line, QEMU-worded,
prefixed with the option it is about.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from pyvm.errors import ConfigError
from pyvm.host_sockets import PortError, parse_port


@dataclass(frozen=True)
class UnixEndpoint:
    path: str


@dataclass(frozen=True)
class TcpEndpoint:
    host: str
    port: int


@dataclass(frozen=True)
class StdioEndpoint:
    pass


Endpoint = Union[UnixEndpoint, TcpEndpoint, StdioEndpoint]


@dataclass(frozen=True)
class MonitorSpec:
    mode: str               # "control" (QMP) or "readline" (human monitor)
    endpoint: Endpoint
    label: str              # the character device id (compat_monitorN for -qmp/-monitor)
    option: str             # the option as written, for messages
    pretty: bool = False
    tls_creds: str | None = None    # tls-creds=ID: a tls-creds-x509 object (server endpoint)
    tls_authz: str | None = None    # tls-authz=ID: an authz-simple/authz-list object

    @property
    def filename(self) -> str:
        """The ``filename`` query-chardev shows for the monitor's character device."""
        ep = self.endpoint
        if isinstance(ep, UnixEndpoint):
            return f"unix:{ep.path},server=on"
        if isinstance(ep, TcpEndpoint):
            return f"tcp:{ep.host}:{ep.port},server=on"
        return "stdio"


_BOOL = {"on": True, "yes": True, "true": True, "y": True,
         "off": False, "no": False, "false": False, "n": False}


def split_opts(text: str) -> list[str]:
    """QemuOpts splitting: ``,`` separates, ``,,`` is a literal comma."""
    parts, cur, i = [], [], 0
    while i < len(text):
        if text[i] == ",":
            if text.startswith(",,", i):
                cur.append(",")
                i += 2
                continue
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(text[i])
        i += 1
    parts.append("".join(cur))
    return parts


def _flag(option: str, key: str, value: str | None) -> bool:
    if value is None:               # short form "server", deprecated but accepted
        return True
    try:
        return _BOOL[value]
    except KeyError:
        raise ConfigError(f"{option}: Parameter '{key}' expects 'on' or 'off'") from None


def _socket_opts(option: str, pairs: list[tuple[str, str | None]]) -> None:
    """Check listener options; only server/wait/nodelay/ipv4/ipv6 are meaningful."""
    server = False
    for key, value in pairs:
        if key == "server":
            server = _flag(option, key, value)
        elif key == "nowait" and value is None:
            continue
        elif key in ("tls-creds", "tls-authz"):
            continue                 # _tls_options
        elif key in ("wait", "nodelay", "ipv4", "ipv6"):
            _flag(option, key, value)
        elif key == "telnet" and not _flag(option, key, value):
            continue
        else:
            raise ConfigError(f"{option}: Invalid parameter '{key}'")
    if not server:
        raise ConfigError(f"{option}: a monitor socket must listen: add server=on,wait=off")


def _tls_options(option: str, pairs: list[tuple[str, str | None]],
                 endpoint: Endpoint) -> tuple[str | None, str | None]:
    """``tls-creds``/``tls-authz`` of a socket monitor (chardev/char-socket.c texts)."""
    found = dict(pairs)
    creds, authz = found.get("tls-creds"), found.get("tls-authz")
    if creds is not None and not isinstance(endpoint, TcpEndpoint):
        raise ConfigError(f"{option}: TLS can only be used over TCP socket")
    if authz is not None and creds is None:
        raise ConfigError(f"{option}: 'tls_authz' option requires 'tls_creds' option")
    return creds, authz


def _pairs(items: list[str]) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    for item in items:
        key, eq, value = item.partition("=")
        out.append((key, value if eq else None))
    return out


def _port(option: str, text: str) -> int:
    try:
        return parse_port(text)
    except PortError as err:
        if err.value is None:
            raise ConfigError(f"{option}: invalid port '{text}'") from None
        raise ConfigError(f"{option}: port {err.value} is out of range") from None


def _host(text: str) -> str:
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    return text or "127.0.0.1"


def parse_compat(option: str, value: str) -> Endpoint | None:
    """The endpoint of ``-qmp VALUE`` / ``-monitor VALUE``; None for ``none``."""
    head, *rest = split_opts(value)
    if head == "none" and not rest:
        return None
    if head == "stdio" and not rest:
        return StdioEndpoint()
    if head.startswith("unix:"):
        path = head[5:]
        if not path:
            raise ConfigError(f"{option}: unix socket path is missing")
        _socket_opts(option, _pairs(rest))
        return UnixEndpoint(path)
    if head.startswith("tcp:"):
        host, sep, port = head[4:].rpartition(":")
        if not sep:
            raise ConfigError(f"{option}: port is missing (tcp:HOST:PORT)")
        _socket_opts(option, _pairs(rest))
        return TcpEndpoint(_host(host), _port(option, port))
    kind = head.split(":", 1)[0]
    raise ConfigError(f"{option}: '{kind}' cannot host a monitor "
                      "(use unix:PATH,server=on,wait=off, tcp:HOST:PORT,server=on,wait=off "
                      "or stdio)")


def _parse_chardev(option: str, value: str) -> tuple[str | None, str, list[tuple[str, str | None]]]:
    parts = split_opts(value)
    backend = parts[0]
    pairs = _pairs(parts[1:])
    if "=" in backend:                     # "backend=socket,id=..." form
        pairs.insert(0, tuple(backend.split("=", 1)))  # type: ignore[arg-type]
        backend = ""
    ident = None
    rest: list[tuple[str, str | None]] = []
    for key, val in pairs:
        if key == "id":
            ident = val
        elif key == "backend" and not backend:
            backend = val or ""
        else:
            rest.append((key, val))
    return ident, backend, rest


def _chardev_endpoint(option: str, backend: str,
                      pairs: list[tuple[str, str | None]]) -> Endpoint:
    if backend == "stdio":
        for key, _ in pairs:
            if key not in ("signal", "mux"):
                raise ConfigError(f"{option}: Invalid parameter '{key}'")
        return StdioEndpoint()
    if backend != "socket":
        raise ConfigError(f"{option}: chardev backend '{backend}' cannot host a monitor")
    found = dict(pairs)
    path, host, port = found.pop("path", None), found.pop("host", None), found.pop("port", None)
    _socket_opts(option, [(k, v) for k, v in pairs if k not in ("path", "host", "port")])
    if path is not None:
        if host is not None or port is not None:
            raise ConfigError(f"{option}: 'path' and 'host'/'port' are mutually exclusive")
        if not path:
            raise ConfigError(f"{option}: unix socket path is missing")
        return UnixEndpoint(path)
    if port is None:
        raise ConfigError(f"{option}: socket needs 'path', or 'host' and 'port'")
    return TcpEndpoint(_host(host or ""), _port(option, port))


def _parse_mon(option: str, value: str) -> tuple[str, str, bool]:
    chardev, mode, pretty = None, "readline", False
    for key, val in _pairs(split_opts(value)):
        if key == "chardev":
            chardev = val
        elif key == "mode":
            if val not in ("readline", "control"):
                raise ConfigError(f"{option}: Parameter 'mode' does not accept value '{val}'")
            mode = val
        elif key == "pretty":
            pretty = _flag(option, key, val)
        elif key == "id":
            continue
        else:
            raise ConfigError(f"{option}: Invalid parameter '{key}'")
    if not chardev:
        raise ConfigError(f"{option}: Parameter 'chardev' is missing")
    if pretty and mode == "readline":
        raise ConfigError(f"{option}: 'pretty' is not compatible with HMP monitors")
    return chardev, mode, pretty


def parse_monitor_options(qmp: list[str], monitor: list[str], chardev: list[str],
                          mon: list[str]) -> list[MonitorSpec]:
    """Monitor specs from the option values; raises ConfigError with one clear line."""
    specs: list[MonitorSpec] = []
    index = 0
    for mode, flag, values in (("control", "-qmp", qmp), ("readline", "-monitor", monitor)):
        for value in values:
            option = f"{flag} {value}"
            endpoint = parse_compat(option, value)
            if endpoint is None:
                continue
            creds, authz = _tls_options(option, _pairs(split_opts(value)[1:]), endpoint)
            specs.append(MonitorSpec(mode, endpoint, f"compat_monitor{index}", option,
                                     tls_creds=creds, tls_authz=authz))
            index += 1
    chardevs: dict[str, tuple[str, str, list[tuple[str, str | None]]]] = {}
    for value in chardev:
        option = f"-chardev {value}"
        ident, backend, pairs = _parse_chardev(option, value)
        if not ident:
            raise ConfigError(f"{option}: Parameter 'id' is missing")
        if ident in chardevs:
            raise ConfigError(f"{option}: attempt to add duplicate property 'id'")
        chardevs[ident] = (option, backend, pairs)
    used: set[str] = set()
    for value in mon:
        option = f"-mon {value}"
        ident, mode, pretty = _parse_mon(option, value)
        if ident not in chardevs:
            raise ConfigError(f'{option}: chardev "{ident}" not found')
        if ident in used:
            raise ConfigError(f"{option}: chardev '{ident}' is already in use")
        used.add(ident)
        dev_option, backend, pairs = chardevs[ident]
        endpoint = _chardev_endpoint(dev_option, backend, pairs)
        creds, authz = _tls_options(dev_option, pairs, endpoint)
        specs.append(MonitorSpec(mode, endpoint, ident, dev_option, pretty, creds, authz))
    for ident, (dev_option, backend, pairs) in chardevs.items():
        # as QEMU, every -chardev is checked at start-up, used or not: a socket without an
        # address fails now (a serial port's chardev:ID parses the rest of its options)
        if ident not in used and backend == "socket" \
                and not {k for k, _ in pairs} & {"path", "host", "port", "fd"}:
            raise ConfigError(f"{dev_option}: socket needs 'path', or 'host' and 'port'")
    _check_unique(specs)
    return specs


def _check_unique(specs: list[MonitorSpec]) -> None:
    seen: dict[object, str] = {}
    stdio = 0
    for spec in specs:
        ep = spec.endpoint
        if isinstance(ep, StdioEndpoint):
            stdio += 1
            if stdio > 1:
                raise ConfigError("cannot use stdio by multiple character devices")
            continue
        if isinstance(ep, TcpEndpoint) and ep.port == 0:
            continue
        if ep in seen:
            raise ConfigError(f"{spec.option}: the endpoint is already used by {seen[ep]}")
        seen[ep] = spec.option


def uses_stdio(specs: list[MonitorSpec]) -> bool:
    return any(isinstance(s.endpoint, StdioEndpoint) for s in specs)
