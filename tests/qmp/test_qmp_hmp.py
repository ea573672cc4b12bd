"""The human monitor: parsing, texts, human-monitor-command, and an HMP socket."""

from __future__ import annotations

import os
from typing import Any

import pytest

from qmp_helpers import RawClient
from fake_vm import VIRT_OFFSET, FakeVm
from pyvm.qmp.context import CommandContext
from pyvm.qmp.errors import HmpError
from pyvm.qmp.hmp import HmpSession
from pyvm.qmp.hmp_table import HmpTable
from pyvm.qmp.hmp_expr import get_expr, get_format
from pyvm.qmp.hmp_format import memory_dump, register_dump
from pyvm.qmp.options import parse_monitor_options
from pyvm.qmp.core import build_tables
from pyvm.qmp.server import MonitorService
from pyvm.runstate import RunState

TABLES = build_tables()
TABLE = TABLES.qmp


def hmp(vm: FakeVm | None = None) -> HmpSession:
    vm = vm or FakeVm()
    return HmpSession(TABLES.hmp, CommandContext(vm, TABLE, hmp_table=TABLES.hmp))


def regs(name: str) -> int | None:
    return {"rax": 0x10, "rip": 0x1000}.get(name)


@pytest.mark.parametrize("text, value", [
    ("1+2*3", 7), ("(1+2)*3", 9), ("0x10 - 1", 15), ("010", 8), ("-1", -1), ("~0", -1),
    ("7/2", 3), ("-7/2", -3), ("-7%2", -1), ("6&3|8", 10), ("1+6&3", 3), ("'A'", 65),
    ("$rax + $rip", 0x1010), ("0xffffffffffffffff", -1),
])
def test_expressions(text: str, value: int) -> None:
    assert get_expr(text, 0, regs)[0] == value


@pytest.mark.parametrize("text, message", [
    ("", "unexpected end of expression"), ("1/0", "division by zero"),
    ("$nope", "unknown register"), ("(1", "')' expected"), ("@", "invalid char '@' in expression"),
    ("0x10000000000000000", "number too large"),
])
def test_expression_errors(text: str, message: str) -> None:
    with pytest.raises(HmpError, match=message.replace("(", r"\(").replace(")", r"\)")):
        get_expr(text, 0, regs)


def test_format_spec() -> None:
    assert get_format("/10xb 0", 0, "x", 4) == (10, "x", 1, 5)
    assert get_format(" 0x100", 0, "d", 2) == (1, "d", 2, 1)
    assert get_format("/i", 0, "x", 4) == (1, "i", -1, 2)
    with pytest.raises(HmpError, match="invalid char in format: 'z'"):
        get_format("/4z", 0, "x", 4)


def test_memory_dump_layouts() -> None:
    data = bytes(range(256))

    def read(addr: int, size: int) -> bytes:
        if addr + size > len(data):
            raise ValueError
        return data[addr:addr + size]
    assert memory_dump(read, 4, "x", 4, 0) == \
        "0000000000000000: 0x03020100 0x07060504 0x0b0a0908 0x0f0e0d0c\n"
    assert memory_dump(read, 10, "x", 1, 0x40).splitlines() == [
        "0000000000000040: 0x40 0x41 0x42 0x43 0x44 0x45 0x46 0x47",
        "0000000000000048: 0x48 0x49"]
    assert memory_dump(read, 2, "d", 2, 0xfe) == \
        "00000000000000fe: Cannot access memory\n"
    assert memory_dump(read, 3, "u", 2, 0) == "0000000000000000:   256   770  1284\n"
    assert memory_dump(read, 2, "o", 1, 8) == "0000000000000008: 010 011\n"
    assert memory_dump(read, 1, "o", 2, 8) == "0000000000000008:  04410\n"
    assert memory_dump(read, 4, "c", 1, 0x26) == "0000000000000026: '&' '\\'' '(' ')'\n"


def test_register_dump_long_mode() -> None:
    text = register_dump(FakeVm().cpu_registers(0))
    lines = text.splitlines()
    assert lines[0] == ("RAX=0000000000001000 RBX=0000000000002000 "
                        "RCX=0000000000003000 RDX=0000000000004000")
    assert lines[4] == ("RIP=ffff800000000100 RFL=00000246 [---Z-P-] CPL=0 II=0 A20=1 "
                        "SMM=0 HLT=0")
    assert lines[6] == "CS =0010 0000000000000000 0000ffff 00a09b00 DPL=0 CS64 [-RA]"
    assert "EFER=0000000000000500" in lines


def test_register_dump_real_mode() -> None:
    lines = register_dump({"rip": 0xFFF0, "rflags": 2, "cs": 0xF000, "cs_base": 0xFFFF0000,
                           "cr0": 0x60000010, "rdx": 0x663}).splitlines()
    assert lines[0] == "EAX=00000000 EBX=00000000 ECX=00000000 EDX=00000663"
    assert lines[2] == "EIP=0000fff0 EFL=00000002 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=0"
    assert lines[4] == "CS =f000 ffff0000 0000ffff 00000000"
    assert lines[13] == "CR0=60000010 CR2=00000000 CR3=00000000 CR4=00000000"


def test_info_status_texts() -> None:
    vm = FakeVm()
    h = hmp(vm)
    assert h.execute("info status") == "VM status: running\n"
    vm.runstate.set(RunState.PAUSED)
    assert h.execute("info status") == "VM status: paused\n"
    vm.runstate.set(RunState.PRELAUNCH)
    assert h.execute("  info   status  ") == "VM status: paused (prelaunch)\n"


def test_stop_cont_quit_reset() -> None:
    vm = FakeVm()
    h = hmp(vm)
    assert h.execute("stop") == ""
    assert vm.runstate.state is RunState.PAUSED
    assert h.execute("c") == ""
    assert vm.runstate.state is RunState.RUNNING
    assert h.execute("system_reset") == ""
    vm.runstate.set(RunState.INMIGRATE)
    assert h.execute("cont") == "Error: Guest is waiting for an incoming migration\n"
    ctx = h.cmd_ctx
    assert h.execute("q") == "" and len(ctx.after_reply) == 1
    assert vm.calls == ["stop", "cont", "system_reset", "cont"]


def test_memory_commands() -> None:
    vm = FakeVm()
    h = hmp(vm)
    assert h.execute("xp /2xg 0x10") == \
        "0000000000000010: 0x%016x 0x%016x\n" % (int.from_bytes(vm.ram[0x10:0x18], "little"),
                                                 int.from_bytes(vm.ram[0x18:0x20], "little"))
    assert h.execute(f"x /1xb {VIRT_OFFSET + 5:#x}") == \
        "%016x: 0x%02x\n" % (VIRT_OFFSET + 5, vm.ram[5])
    # The format is remembered: "xp 0" now dumps one byte in hex.
    assert h.execute("xp 0") == "0000000000000000: 0x%02x\n" % vm.ram[0]
    assert h.execute("x/2i $pc").startswith("0xffff800000000100: ")
    assert h.execute("xp /1xw 0x7fffffff") == "000000007fffffff: Cannot access memory\n"
    assert h.execute("p/x 0x10+0x20") == "0x30\n"
    assert h.execute("print $rax") == "0x1000\n"       # the last format sticks
    assert h.execute("p/d $eax - 4097") == "-1\n"


def test_info_commands() -> None:
    vm = FakeVm(name="g")
    h = hmp(vm)
    assert h.execute("info registers").startswith("\nCPU#0\nRAX=")
    assert h.execute("info registers 1").startswith("\nCPU#1\nRAX=0000000000001001")
    assert h.execute("info registers 5") == "CPU#5 not available\n"
    assert h.execute("info registers -a").count("CPU#") == 2
    assert h.execute("info mtree") == vm.mtree()
    assert h.execute("info name") == "g\n"
    assert h.execute("info kvm") == "kvm support: not compiled\n"
    assert h.execute("info cpus") == ("* CPU #0: thread_id=4242\n"
                                      "  CPU #1: thread_id=4243\n")
    assert h.execute("cpu 1") == "" and h.execute("info cpus").startswith("  CPU #0")
    assert h.execute("cpu 9") == "invalid CPU index\n"


def test_errors_and_help() -> None:
    h = hmp()
    assert h.execute("frobnicate 1") == "unknown command: 'frobnicate'\n"
    assert h.execute("info frob") == "unknown command: 'info frob'\n"
    assert h.execute("x") == "unexpected end of expression\nTry \"help x\" for more information\n"
    assert h.execute("stop now") == ("stop|s: extraneous characters at the end of line\n"
                                     "Try \"help stop\" for more information\n")
    assert h.execute("info registers -z") == (
        "registers: unsupported option -z\n"
        "Try \"help info registers\" for more information\n")
    text = h.execute("help")
    assert "cont|c  -- resume emulation\n" in text
    assert "x /fmt addr -- virtual memory dump starting at 'addr'\n" in text
    lines = text.splitlines()
    assert lines == sorted(lines)
    assert h.execute("help info status") == \
        "info status  -- show the current VM status (running|paused)\n"
    assert h.execute("info").startswith("info chardev  -- ")
    assert h.execute("? c") == "cont|c  -- resume emulation\n"
    assert h.execute("help nope") == "unknown command: 'nope'\n"


def test_extension_commands_use_the_same_parser() -> None:
    table = HmpTable()
    seen: dict[str, Any] = {}
    table.register("migrate", "detach:-d,resume:-r,uri:s", "[-d] [-r] uri",
                   "migrate to URI", lambda ctx, args: seen.update(args))
    table.register("migrate_set_capability", "capability:s,state:b",
                   "capability state", "set", lambda ctx, args: seen.update(args))
    session = HmpSession(table, CommandContext(FakeVm(), TABLE))
    assert session.execute("migrate -d tcp:127.0.0.1:4444") == ""
    assert seen == {"detach": True, "uri": "tcp:127.0.0.1:4444"}
    assert session.execute('migrate "exec:cat > /tmp/x"') == ""
    assert seen["uri"] == "exec:cat > /tmp/x"
    assert session.execute("migrate_set_capability events on") == ""
    assert seen["state"] is True
    assert session.execute("migrate_set_capability events maybe") == (
        "Expected 'on' or 'off'\nTry \"help migrate_set_capability\" for more information\n")
    assert session.execute("migrate") == ("migrate: string expected\n"
                                          "Try \"help migrate\" for more information\n")


def test_human_monitor_command_over_qmp(client: RawClient, vm: FakeVm) -> None:
    assert client.cmd("human-monitor-command", {"command-line": "info status"}) == \
        {"return": "VM status: running\r\n"}
    assert client.cmd("human-monitor-command", {"command-line": "stop"}) == {"return": ""}
    assert client.events[-1]["event"] == "STOP"
    assert client.cmd("human-monitor-command",
                      {"command-line": "info registers", "cpu-index": 1}
                      )["return"].startswith("\r\nCPU#1\r\n")
    assert client.cmd("human-monitor-command", {"command-line": "info status",
                                                "cpu-index": 3}) == {
        "error": {"class": "GenericError", "desc": "Parameter 'cpu-index' expects a CPU number"}}
    assert client.cmd("human-monitor-command", {}) == {
        "error": {"class": "GenericError", "desc": "Parameter 'command-line' is missing"}}


def test_hmp_socket_session(vm: FakeVm, tmp_path: Any) -> None:
    path = os.path.join(str(tmp_path), "h.sock")
    specs = parse_monitor_options([], [f"unix:{path},server=on,wait=off"], [], [])
    svc = MonitorService(vm, specs)
    svc.start()
    try:
        c = RawClient(path)
        banner = c.raw_line()
        assert banner == b"pyvm 0.1.0 monitor - type 'help' for more information\r\n"

        def prompt_reply() -> bytes:
            while b"(qemu) " not in c.buf:
                c.buf += c.sock.recv(4096)
            reply, _, c.buf = c.buf.partition(b"(qemu) ")
            return reply + b"(qemu) "
        assert prompt_reply() == b"(qemu) "
        c.send(b"info status\r\n")
        assert prompt_reply() == b"VM status: running\r\n(qemu) "
        c.send(b"stop\n")
        assert prompt_reply() == b"(qemu) "
        assert vm.runstate.state is RunState.PAUSED
        c.send(b"info status\nxp /1xb 0\n")
        assert prompt_reply() == b"VM status: paused\r\n(qemu) "
        assert prompt_reply() == b"0000000000000000: 0x%02x\r\n(qemu) " % vm.ram[0]
        c.send(b"x" * (70 << 10))
        c.send(b"\ninfo name\n")
        reply = prompt_reply()
        assert reply.startswith(b"command line too long")
    finally:
        svc.close()
