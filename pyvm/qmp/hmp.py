"""The human monitor (HMP): command table, argument parsing and line execution.

Commands are declared as QEMU declares them (hmp-commands.hx): a name with aliases
(``"cont|c"``), an ``args_type`` string, the ``params`` and ``help`` texts shown by
``help``, and a handler ``handler(ctx, args)`` that prints through ``ctx.print``.
``info`` subcommands live in a second table.  Handlers reach QMP commands with
``ctx.qmp(name, args)``, so both monitors share one implementation and one set of error
texts (an error is printed as ``Error: <desc>``).

``args_type`` is a comma-separated list of ``key:type`` with QEMU's types:
``s`` word or quoted string, ``F`` file name, ``S`` rest of the line, ``i`` 32-bit and
``l`` 64-bit expression, ``b`` ``on``/``off``, ``/`` a ``/count-format-size`` spec
(sets ``count``, ``format``, ``size``), ``-x`` a flag; ``?`` after the type makes it
optional.  The tables themselves (:class:`~pyvm.qmp.hmp_table.HmpTable`) are built with
the QMP table by whoever builds the monitor (:func:`pyvm.qmp.core.build_tables`).

Output lines end in ``\\r\\n`` on the wire (:func:`crlf`), as QEMU's monitor writes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pyvm.qmp.context import CommandContext
from pyvm.qmp.dispatch import execute
from pyvm.qmp.errors import CommandError, HmpError, SchemaError
from pyvm.qmp.hmp_expr import get_expr, get_format, get_str, skip_space
from pyvm.qmp.hmp_table import HmpCommand, HmpTable

PROMPT = "(qemu) "


@dataclass
class HmpState:
    """What one human monitor remembers between lines."""

    cpu_index: int = 0
    last_format: str = "x"      # monitor/hmp.c default_fmt_format
    last_size: int = 4          # default_fmt_size


class HmpContext:
    """A handler's view: printing, the VM, QMP commands, the monitor state."""

    def __init__(self, cmd_ctx: CommandContext, state: HmpState, table: "HmpTable") -> None:
        self.cmd_ctx = cmd_ctx
        self.state = state
        self.table = table
        self.out: list[str] = []

    @property
    def vm(self) -> Any:
        return self.cmd_ctx.vm

    def print(self, text: str) -> None:
        self.out.append(text)

    def qmp(self, name: str, args: dict[str, Any] | None = None) -> Any:
        self.cmd_ctx.cpu_index = self.state.cpu_index
        return execute(self.cmd_ctx, name, args)

    def register(self, name: str) -> int | None:
        """CPU register lookup for ``$name`` in expressions (QEMU's monitor_defs subset)."""
        regs = self.vm.cpu_registers(self.state.cpu_index)
        key = name.lower()
        if key in regs:
            return int(regs[key])
        if key == "pc":
            # monitor/hmp-target.c monitor_get_pc: env->eip + env->segs[R_CS].base
            return (int(regs.get("rip", 0)) + int(regs.get("cs_base", 0))) & ((1 << 64) - 1)
        if key[0] == "e" and "r" + key[1:] in regs:          # eax, eip, eflags
            return int(regs["r" + key[1:]]) & 0xFFFFFFFF
        return None


def command_name(line: str, pos: int) -> tuple[str, int] | None:
    """monitor/hmp.c get_command_name: a word ending at space or ``/``."""
    pos = skip_space(line, pos)
    if pos >= len(line):
        return None
    end = pos
    while end < len(line) and line[end] != "/" and not line[end].isspace():
        end += 1
    return line[pos:end], end


def parse_args(ctx: HmpContext, cmd: HmpCommand, line: str, pos: int) -> dict[str, Any]:
    """monitor_parse_arguments for the supported types; raises HmpError with QEMU's text."""
    args: dict[str, Any] = {}
    specs = [s for s in cmd.args_type.split(",") if s]
    for index, spec in enumerate(specs):
        key, _, kind = spec.partition(":")
        optional = kind.endswith("?")
        kind = kind.rstrip("?")
        if kind in ("s", "F", "B"):
            word = get_str(line, pos)
            if word is None:
                if optional:
                    continue
                what = {"F": "filename", "B": "block device name"}.get(kind, "string")
                raise HmpError(f"{cmd.name}: {what} expected")
            args[key], pos = word
        elif kind == "S":
            pos = skip_space(line, pos)
            if pos >= len(line):
                if optional:
                    continue
                raise HmpError(f"{cmd.name}: string expected")
            args[key], pos = line[pos:].rstrip(), len(line)
        elif kind in ("i", "l"):
            pos = skip_space(line, pos)
            if optional and pos >= len(line):
                continue
            value, pos = get_expr(line, pos, ctx.register)
            if kind == "i" and (value >> 32) & 0xFFFFFFFF:
                raise HmpError(f"'{cmd.name}' has failed: integer is for 32-bit values")
            args[key] = value
        elif kind == "b":
            pos = skip_space(line, pos)
            end = pos
            while end < len(line) and line[end].isprintable() and not line[end].isspace():
                end += 1
            flag = line[pos:end]
            if flag not in ("on", "off"):
                raise HmpError("Expected 'on' or 'off'")
            args[key], pos = flag == "on", end
        elif kind == "/":
            count, fmt, size, pos = get_format(line, pos, ctx.state.last_format,
                                               ctx.state.last_size)
            ctx.state.last_format = fmt
            if fmt != "i":
                ctx.state.last_size = size
            args.update(count=count, format=fmt, size=size)
        elif kind.startswith("-") and len(kind) == 2:
            start = pos
            pos = skip_space(line, pos)
            if line.startswith("-", pos):
                letter = line[pos + 1:pos + 2]
                if letter == kind[1]:
                    args[key] = True
                    pos += 2
                else:
                    later = {s.partition(":")[2] for s in specs[index + 1:]}
                    if "-" + letter not in later:
                        raise HmpError(f"{cmd.name}: unsupported option -{letter}")
                    pos = start
            else:
                pos = start
        else:
            raise SchemaError(f"HMP command {cmd.name}: unsupported argument type '{kind}'")
    if skip_space(line, pos) < len(line):
        raise HmpError(f"{cmd.name}: extraneous characters at the end of line")
    return args


def run_line(table: HmpTable, cmd_ctx: CommandContext, state: HmpState, line: str) -> str:
    """Execute one command line; returns what the monitor prints (``\\n`` line ends)."""
    ctx = HmpContext(cmd_ctx, state, table)
    found = command_name(line, 0)
    if found is None:
        return ""
    word, pos = found
    cmds = table.commands()
    cmd = HmpTable.find(cmds, word)
    if cmd is not None and cmd.name == "info":
        sub = command_name(line, pos)
        if sub is not None:
            word, pos = sub
            cmd = HmpTable.find(table.info_commands(), word)
    if cmd is None:
        return f"unknown command: '{line[:pos]}'\n"
    try:
        args = parse_args(ctx, cmd, line, pos)
    except HmpError as err:
        name_end = pos
        while name_end > 0 and line[name_end - 1].isspace():
            name_end -= 1
        return f"{err}\nTry \"help {line[:name_end]}\" for more information\n"
    try:
        cmd.handler(ctx, args)
    except CommandError as err:
        ctx.print(f"Error: {err.desc}\n")
    except HmpError as err:
        ctx.print(f"{err}\n")
    return "".join(ctx.out)


def crlf(text: str) -> bytes:
    """Monitor output bytes: every ``\\n`` becomes ``\\r\\n`` (monitor_puts)."""
    return text.replace("\n", "\r\n").encode("utf-8", "replace")


def help_text(table: HmpTable, words: list[str]) -> str:
    """``help [cmd [sub]]``: one line per command, ``name params -- help``."""
    def line(cmd: HmpCommand, prefix: list[str]) -> str:
        return "".join(p + " " for p in prefix) + f"{cmd.name} {cmd.params} -- {cmd.help}\n"

    if not words:
        return "".join(line(c, []) for c in table.commands())
    cmd = HmpTable.find(table.commands(), words[0])
    if cmd is not None and cmd.name == "info":
        if len(words) == 1:
            return "".join(line(c, ["info"]) for c in table.info_commands())
        sub = HmpTable.find(table.info_commands(), words[1])
        if sub is not None:
            return line(sub, ["info"])
        return "unknown command: '" + " ".join(words[:2]) + "'\n"
    if cmd is None:
        return f"unknown command: '{words[0]}'\n"
    return line(cmd, [])


@dataclass
class HmpSession:
    """One human monitor: a table, the VM context and what it remembers."""

    table: HmpTable
    cmd_ctx: CommandContext
    state: HmpState = field(default_factory=HmpState)

    def execute(self, line: str) -> str:
        return run_line(self.table, self.cmd_ctx, self.state, line)
