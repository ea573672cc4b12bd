"""Bounds on what one monitor command may make pyvm do.

Commands run one at a time on the monitor's command thread, and every connection has at
most one command in flight, so clients take turns; what keeps one client from holding up
another's ``stop`` is that no single command runs long.  QEMU bounds none of these (its
``x``/``xp`` loop, monitor/hmp-cmds-target.c ``memory_dump``, prints as many cells as
asked, and ``get_expr`` in monitor/hmp.c recurses without a limit); pyvm refuses beyond:

* ``MAX_DUMP_BYTES`` of memory for one ``x``/``xp`` (64 KiB: 8,192 lines of ``/xb``, about
  0.4 MB of text, a few tens of milliseconds), and ``MAX_DISASM_INSNS`` instructions for
  ``x/Ni``;
* ``MAX_EXPR_DEPTH`` levels of parentheses and unary operators in an expression.
"""

from __future__ import annotations

from pyvm.qmp.errors import HmpError

MAX_DUMP_BYTES = 64 << 10
MAX_DISASM_INSNS = 4096
MAX_EXPR_DEPTH = 64


def check_dump(command: str, count: int, fmt: str, size: int) -> None:
    """Refuse an ``x``/``xp`` request beyond the bounds above (before reading anything)."""
    if fmt == "i":
        if count > MAX_DISASM_INSNS:
            raise HmpError(f"{command}: at most {MAX_DISASM_INSNS} instructions per command "
                           f"(asked for {count})")
        return
    # memory_dump's unit: one byte for characters, else the size (4 when none is valid)
    wsize = 1 if fmt == "c" else size if size in (1, 2, 4, 8) else 4
    if count * wsize > MAX_DUMP_BYTES:
        raise HmpError(f"{command}: at most {MAX_DUMP_BYTES} bytes per command "
                       f"(asked for {count * wsize})")


def depth_error() -> HmpError:
    return HmpError(f"expression nested too deeply (at most {MAX_EXPR_DEPTH} levels)")
