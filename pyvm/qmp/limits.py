"""Bounds on what one monitor command may make pyvm do.

Commands run one at a time on the monitor's command thread, and every connection has at
most one command in flight, so clients take turns; what keeps one client from holding up
another's ``stop`` is that no single command runs long.  QEMU bounds none of these (its
``x``/``xp`` loop, monitor/hmp-cmds-target.c ``memory_dump``, prints as many cells as
asked, and ``get_expr`` in monitor/hmp.c recurses without a limit); pyvm refuses beyond:

* ``MAX_DUMP_VALUES`` values for one ``x``/``xp`` (4,096: 512 lines of ``/xb``, 32 KiB of
  memory with ``/xg``; tens of milliseconds), and ``MAX_DISASM_INSNS`` instructions for
  ``x/Ni`` (capstone costs about a millisecond an instruction here);
* ``MAX_EXPR_DEPTH`` levels of parentheses and unary operators in an expression;
* ``MAX_COMMAND_LINE`` bytes of command line for ``human-monitor-command`` (a megabyte
  expression would otherwise keep the command thread busy for seconds).
"""

from __future__ import annotations

from pyvm.qmp.errors import HmpError

MAX_COMMAND_LINE = 64 << 10      # bytes; the human monitor's socket has the same bound
MAX_DUMP_VALUES = 4096
MAX_DISASM_INSNS = 128
MAX_EXPR_DEPTH = 64


def check_dump(command: str, count: int, fmt: str, size: int) -> None:
    """Refuse an ``x``/``xp`` request beyond the bounds above (before reading anything)."""
    if fmt == "i":
        if count > MAX_DISASM_INSNS:
            raise HmpError(f"{command}: at most {MAX_DISASM_INSNS} instructions per command "
                           f"(asked for {count})")
        return
    if count > MAX_DUMP_VALUES:
        raise HmpError(f"{command}: at most {MAX_DUMP_VALUES} values per command "
                       f"(asked for {count})")


def command_line_too_long(line: str) -> str | None:
    """The human monitor's answer to an over-long line, or None when it is within bounds."""
    if len(line.encode("utf-8", "surrogatepass")) <= MAX_COMMAND_LINE:
        return None
    return f"command line too long (limit {MAX_COMMAND_LINE} bytes)\n"


def depth_error() -> HmpError:
    return HmpError(f"expression nested too deeply (at most {MAX_EXPR_DEPTH} levels)")
