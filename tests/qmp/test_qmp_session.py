"""The sans-IO QMP session: request checks (qapi/qmp-dispatch.c, monitor/qmp.c) joined in memory."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fake_vm import FakeVm
from pyvm.qmp.context import CommandContext
from pyvm.qmp.dispatch import Call, Reply, run_call
from pyvm.qmp.core import build_tables
from pyvm.qmp.session import QmpSession
from pyvm.runstate import RunState

TABLE = build_tables().qmp


class Peer:
    """A session plus a synchronous executor: bytes in, reply dicts out."""

    def __init__(self) -> None:
        self.vm = FakeVm()
        self.session = QmpSession(TABLE)

    def send(self, data: bytes | str) -> list[dict[str, Any]]:
        if isinstance(data, str):
            data = data.encode()
        out = []
        for item in self.session.feed(data):
            step = self.session.prepare(item)
            if isinstance(step, Reply):
                msg = step.msg
            else:
                assert isinstance(step, Call)
                msg = run_call(step, CommandContext(self.vm, TABLE, self.session.state))
            out.append(json.loads(self.session.encode(msg)))
        return out

    def one(self, data: bytes | str) -> dict[str, Any]:
        [reply] = self.send(data)
        return reply


def generic(desc: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"class": "GenericError", "desc": desc}, **extra}


def test_greeting_bytes() -> None:
    assert QmpSession(TABLE).greeting() == (
        b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 8}, '
        b'"package": "pyvm 0.1.0"}, "capabilities": []}}\r\n')


def test_negotiation_gate() -> None:
    p = Peer()
    text = "Expecting capabilities negotiation with 'qmp_capabilities'"
    assert p.one('{"execute": "query-status", "id": 1}') == \
        {"error": {"class": "CommandNotFound", "desc": text}, "id": 1}
    assert p.one('{"execute": "no-such", "id": "x"}') == \
        {"error": {"class": "CommandNotFound", "desc": text}, "id": "x"}
    assert p.one('{"id": 5}') == generic("QMP input lacks member 'execute'", id=5)
    assert p.one('{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}') == \
        generic("Capability oob not available")
    assert p.one('{"execute": "qmp_capabilities", "arguments": {"enable": ["foo"]}}') == \
        generic("Parameter 'null' does not accept value 'foo'")
    assert p.one('{"execute": "qmp_capabilities"}') == {"return": {}}
    assert p.one('{"execute": "qmp_capabilities", "id": 2}') == {
        "error": {"class": "CommandNotFound",
                  "desc": "Capabilities negotiation is already complete, command ignored"},
        "id": 2}
    assert p.one('{"execute": "query-status"}')["return"]["status"] == "running"


def test_negotiation_and_command_in_one_packet() -> None:
    p = Peer()
    replies = p.send('{"execute": "qmp_capabilities"}{"execute": "query-kvm"}')
    assert replies == [{"return": {}}, {"return": {"enabled": False, "present": False}}]


@pytest.mark.parametrize("request_text, desc", [
    ('[1, 2]', "QMP input must be a JSON object"),
    ('"query-status"', "QMP input must be a JSON object"),
    ('3 ', "QMP input must be a JSON object"),
    ('null ', "QMP input must be a JSON object"),
    ('{}', "QMP input lacks member 'execute'"),
    ('{"execute": 1}', "QMP input member 'execute' must be a string"),
    ('{"execute": "query-status", "arguments": []}',
     "QMP input member 'arguments' must be an object"),
    ('{"execute": "query-status", "foo": 1}', "QMP input member 'foo' is unexpected"),
    ('{"exec-oob": "query-status"}', "QMP input member 'exec-oob' is unexpected"),
    ('{"execute": "query-status", "exec-oob": "query-status"}',
     "QMP input member 'exec-oob' is unexpected"),
    ('{"execute": "query-status", "arguments": {"x": 1}}', "Parameter 'x' is unexpected"),
])
def test_request_validation_texts(request_text: str, desc: str) -> None:
    p = Peer()
    p.one('{"execute": "qmp_capabilities"}')
    reply = p.one(request_text)
    assert reply["error"] == {"class": "GenericError", "desc": desc}
    assert "id" not in reply


def test_unknown_command_after_negotiation() -> None:
    p = Peer()
    p.one('{"execute": "qmp_capabilities"}')
    assert p.one('{"execute": "frobnicate", "id": [1]}') == {
        "error": {"class": "CommandNotFound", "desc": "The command frobnicate has not been found"},
        "id": [1]}


@pytest.mark.parametrize("ident", ["abc", 7, -1, 1.5, 18446744073709551615, True, False, None,
                                   [], [1, "a"], {}, {"nested": {"x": [None]}}])
def test_id_echo_every_type(ident: Any) -> None:
    p = Peer()
    raw = json.dumps(ident)
    assert p.one('{"execute": "qmp_capabilities", "id": %s}' % raw) == {"return": {}, "id": ident}
    assert p.one('{"execute": "query-name", "id": %s}' % raw) == {"return": {}, "id": ident}
    assert p.one('{"id": %s, "execute": "nope"}' % raw)["id"] == ident
    assert p.one('{"execute": "stop", "arguments": {"a": 1}, "id": %s}' % raw) == \
        generic("Parameter 'a' is unexpected", id=ident)


def test_parse_errors_have_no_id() -> None:
    p = Peer()
    assert p.send('{"execute": "x", "id": 1,}') == [generic("JSON parse error, expecting value")]


def test_single_quotes_accepted() -> None:
    p = Peer()
    assert p.one("{'execute': 'qmp_capabilities', 'id': 'it\\'s'}") == \
        {"return": {}, "id": "it's"}


def test_stop_cont_idempotent_and_errors() -> None:
    p = Peer()
    p.one('{"execute": "qmp_capabilities"}')
    assert p.one('{"execute": "cont"}') == {"return": {}}
    assert p.one('{"execute": "stop"}') == {"return": {}}
    assert p.one('{"execute": "stop"}') == {"return": {}}
    assert p.one('{"execute": "query-status"}')["return"] == \
        {"status": "paused", "singlestep": False, "running": False}
    p.vm.runstate.set(RunState.INMIGRATE)
    assert p.one('{"execute": "cont"}') == generic("Guest is waiting for an incoming migration")


def test_query_status_key_order_matches_qemu() -> None:
    p = Peer()
    p.one('{"execute": "qmp_capabilities"}')
    p.vm.runstate.set(RunState.PRELAUNCH)
    for item in p.session.feed(b'{"execute": "query-status"}'):
        step = p.session.prepare(item)
        assert isinstance(step, Call)
        line = p.session.encode(run_call(step, CommandContext(p.vm, TABLE, p.session.state)))
    # Observed on QEMU 7.2 (qapi/run-state.json StatusInfo, printed in QDict order).
    assert line == b'{"return": {"status": "prelaunch", "singlestep": false, "running": false}}\r\n'


def test_query_commands_lists_the_table() -> None:
    p = Peer()
    p.one('{"execute": "qmp_capabilities"}')
    names = [c["name"] for c in p.one('{"execute": "query-commands"}')["return"]]
    assert names == [c.name for c in TABLE.commands()]
    for required in ("qmp_capabilities", "query-version", "query-commands", "query-qmp-schema",
                     "query-status", "query-name", "query-uuid", "query-kvm", "query-cpus-fast",
                     "query-memdev", "query-chardev", "stop", "cont", "system_reset",
                     "system_powerdown", "quit", "pmemsave", "memsave",
                     "human-monitor-command"):
        assert required in names


def test_handler_crash_is_an_error_reply() -> None:
    from pyvm.qmp.registry import CommandTable

    def boom(ctx: Any, args: Any) -> None:
        raise RuntimeError("kaput")
    table = CommandTable()
    table.register("boom", None, None, boom)
    session = QmpSession(table)
    session.state.negotiated = True
    [item] = session.feed(b'{"execute": "boom", "id": 3}')
    step = session.prepare(item)
    assert isinstance(step, Call)
    msg = run_call(step, CommandContext(FakeVm(), table, session.state))
    assert msg == {"error": {"class": "GenericError", "desc": "internal error in boom: kaput"},
                   "id": 3}


def test_cont_from_prelaunch_starts_the_guest() -> None:
    p = Peer()
    p.vm.runstate.set(RunState.PRELAUNCH)
    seen: list[str] = []
    p.vm.events.subscribe(lambda ev: seen.append(ev.name))
    p.one('{"execute": "qmp_capabilities"}')
    assert p.one('{"execute": "cont"}') == {"return": {}}
    assert p.vm.runstate.state is RunState.RUNNING and seen == ["RESUME"]
    assert p.one('{"execute": "cont"}') == {"return": {}}
    assert seen == ["RESUME"]                            # running: no second event
