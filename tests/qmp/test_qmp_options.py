"""Command-line monitor options: accepted forms and one-line errors."""

from __future__ import annotations

import pytest

from pyvm.errors import ConfigError
from pyvm.qmp.options import (MonitorSpec, StdioEndpoint, TcpEndpoint, UnixEndpoint,
                              parse_monitor_options, split_opts, uses_stdio)


def parse(qmp: list[str] = [], monitor: list[str] = [], chardev: list[str] = [],
          mon: list[str] = []) -> list[MonitorSpec]:
    return parse_monitor_options(list(qmp), list(monitor), list(chardev), list(mon))


def test_short_forms() -> None:
    specs = parse(["unix:/tmp/a.sock,server=on,wait=off", "tcp::4444,server=on,wait=off",
                   "tcp:[::1]:5555,server,nowait", "tcp:0.0.0.0:1,server=on", "none"],
                  ["stdio"])
    assert [s.endpoint for s in specs] == [
        UnixEndpoint("/tmp/a.sock"), TcpEndpoint("127.0.0.1", 4444), TcpEndpoint("::1", 5555),
        TcpEndpoint("0.0.0.0", 1), StdioEndpoint()]
    assert [s.mode for s in specs] == ["control"] * 4 + ["readline"]
    assert [s.label for s in specs] == [f"compat_monitor{i}" for i in range(5)]
    assert uses_stdio(specs)
    assert specs[0].filename == "unix:/tmp/a.sock,server=on"
    assert not uses_stdio(parse(["stdio"])[:0])


def test_long_forms() -> None:
    specs = parse(chardev=["socket,id=m0,path=/tmp/m0,server=on,wait=off",
                           "socket,id=m1,host=127.0.0.2,port=7000,server=on,wait=off",
                           "stdio,id=io", "file,id=log,path=/tmp/serial.log"],
                  mon=["chardev=m0,mode=control", "chardev=m1,mode=control,pretty=on",
                       "chardev=io"])
    assert [(s.mode, s.endpoint, s.label, s.pretty) for s in specs] == [
        ("control", UnixEndpoint("/tmp/m0"), "m0", False),
        ("control", TcpEndpoint("127.0.0.2", 7000), "m1", True),
        ("readline", StdioEndpoint(), "io", False)]


def test_qemu_opts_comma_escape() -> None:
    assert split_opts("unix:/tmp/a,,b,server=on") == ["unix:/tmp/a,b", "server=on"]
    [spec] = parse(["unix:/tmp/a,,b,server=on"])
    assert spec.endpoint == UnixEndpoint("/tmp/a,b")


@pytest.mark.parametrize("kwargs, message", [
    ({"qmp": ["unix:/tmp/x"]}, "-qmp unix:/tmp/x: a monitor socket must listen"),
    ({"qmp": ["tcp:localhost"]}, "-qmp tcp:localhost: port is missing"),
    ({"qmp": ["tcp::http,server=on"]}, "-qmp tcp::http,server=on: invalid port 'http'"),
    ({"qmp": ["tcp::70000,server=on"]}, "port 70000 is out of range"),
    ({"qmp": ["telnet::4444,server=on"]}, "-qmp telnet::4444,server=on: 'telnet' cannot host"),
    ({"qmp": ["unix:/x,server=on,frob=1"]}, "Invalid parameter 'frob'"),
    ({"qmp": ["unix:/x,server=maybe"]}, "Parameter 'server' expects 'on' or 'off'"),
    ({"qmp": ["stdio"], "monitor": ["stdio"]},
     "cannot use stdio by multiple character devices"),
    ({"qmp": ["unix:/x,server=on", "unix:/x,server=on"]}, "already used by -qmp unix:/x"),
    ({"mon": ["chardev=nope,mode=control"]}, '-mon chardev=nope,mode=control: chardev "nope" '
                                             "not found"),
    ({"chardev": ["socket,id=a,path=/x,server=on"], "mon": ["chardev=a,mode=json"]},
     "Parameter 'mode' does not accept value 'json'"),
    ({"chardev": ["socket,id=a,path=/x,server=on"], "mon": ["mode=control"]},
     "Parameter 'chardev' is missing"),
    ({"chardev": ["socket,path=/x,server=on"]}, "Parameter 'id' is missing"),
    ({"chardev": ["socket,id=a,path=/x,server=on"], "mon": ["chardev=a,pretty=on"]},
     "'pretty' is not compatible with HMP monitors"),
    ({"chardev": ["socket,id=a,path=/x,host=h,port=1,server=on"], "mon": ["chardev=a"]},
     "mutually exclusive"),
    ({"chardev": ["file,id=a,path=/x"], "mon": ["chardev=a"]},
     "chardev backend 'file' cannot host a monitor"),
    ({"chardev": ["socket,id=a,path=/x,server=on"], "mon": ["chardev=a", "chardev=a"]},
     "already in use"),
])
def test_errors(kwargs: dict[str, list[str]], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(**kwargs)
    text = str(info.value)
    assert message in text and "\n" not in text
