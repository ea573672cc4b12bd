"""``pyvm-monitor``: run human-monitor (HMP) commands on a running VM over QMP.

    pyvm-monitor qmp.sock 'info registers' 'x /4i $pc'
    pyvm-monitor qmp.sock                 (one command per line from stdin)
    pyvm-monitor qmp.sock --until 'HLT=1' 'info registers'

``--until REGEX`` repeats the commands until the last one's output matches REGEX (or
``--timeout`` seconds pass, exit status 1) and prints only that final round: a way to
wait for the guest to reach a state.

Each command goes through QMP's ``human-monitor-command``, exactly what QEMU's
``qmp-shell -H`` does, and its output is printed as the monitor prints it (without the
``(qemu)`` prompt, so the output of a script is just the answers).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from typing import Any

from pyvm.qmp_client import ToolError, close, command, connect


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="pyvm-monitor", description=__doc__.splitlines()[0])
    ap.add_argument("qmp", help="the VM's QMP socket: PATH, unix:PATH or HOST:PORT")
    ap.add_argument("commands", nargs="*", help="HMP command lines (default: read stdin)")
    ap.add_argument("--until", metavar="REGEX",
                    help="repeat the commands until the last output matches REGEX")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds --until waits")
    args = ap.parse_intermixed_args(argv)
    if args.until and not args.commands:
        ap.error("--until needs commands on the command line")
    try:
        qmp = connect(args.qmp)
    except ToolError as err:
        print(f"pyvm-monitor: {err}", file=sys.stderr)
        return 1
    try:
        if args.until:
            return _until(qmp, args.commands, re.compile(args.until), args.timeout)
        status = 0
        for line in args.commands or (line.rstrip("\n") for line in sys.stdin):
            if not line.strip():
                continue
            out, ok = _run(qmp, line)
            sys.stdout.write(out)
            sys.stdout.flush()
            status |= 0 if ok else 1
        return status
    finally:
        close(qmp)


def _run(qmp: Any, line: str) -> tuple[str, bool]:
    try:
        out = command(qmp, "human-monitor-command", **{"command-line": line})
    except ToolError as err:
        print(f"pyvm-monitor: {err}", file=sys.stderr)
        return "", False
    text = str(out).replace("\r\n", "\n")
    return (text if not text or text.endswith("\n") else text + "\n"), True


def _until(qmp: Any, commands: list[str], pattern: "re.Pattern[str]", timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        outs = [_run(qmp, line)[0] for line in commands]
        if pattern.search(outs[-1]):
            sys.stdout.write("".join(outs))
            return 0
        if time.monotonic() > deadline:
            sys.stdout.write("".join(outs))
            print(f"pyvm-monitor: '{pattern.pattern}' not seen within {timeout:g} s",
                  file=sys.stderr)
            return 1
        time.sleep(0.05)


if __name__ == "__main__":
    sys.exit(main())
