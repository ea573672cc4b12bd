"""``pyvm-migrate``: drive a live migration over QMP and watch it happen.

    pyvm-migrate --verbose src.qmp unix:mig.sock --dest dst.qmp
    pyvm-migrate --verbose src.qmp file:vm.state --history h.json --figures figs/

In the spirit of ``virsh migrate --live --verbose``: it sets capabilities and parameters,
starts the destination's ``-incoming defer`` with ``migrate-incoming`` when given its
QMP socket, issues ``migrate`` on the source and samples ``query-migrate`` until the
migration ends.  On a terminal the progress is a bar (bytes, rate, round, expected
downtime, drawn with ``rich``); otherwise one line per round.  ``--pagemap`` shows the
source's RAM as a map of pages (``x-query-ram-pagemap``).  The final statistics are the
source's ``info migrate``.  ``--history`` keeps every sample as JSON and ``--figures``
draws them (:mod:`pyvm.migration_figures`).  Exit status 0 when the migration completed.

``rich`` and the figure module (matplotlib) are imported where they are used, deferred on
purpose: a plain run on a pipe or without ``--figures`` never loads them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from pyvm.qmp_client import ToolError, close, command, connect
from pyvm.size import parse_size

DONE = ("completed", "failed", "cancelled")
MIB = 1 << 20


def _kv(text: str, what: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{what} must be NAME=VALUE, not '{text}'")
    return name, value


def _param_value(text: str) -> Any:
    if text in ("on", "true"):
        return True
    if text in ("off", "false"):
        return False
    try:
        return int(text, 0)
    except ValueError:
        pass
    try:
        return parse_size(text, "")            # 4M, 512K ... as -m takes them
    except ValueError:
        return text


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="pyvm-migrate", description=__doc__.splitlines()[0])
    ap.add_argument("source", help="the source VM's QMP socket (PATH, unix:PATH, HOST:PORT)")
    ap.add_argument("uri", help="migration URI: tcp:HOST:PORT, unix:PATH, exec:CMD, file:PATH")
    ap.add_argument("--dest", metavar="QMP",
                    help="the destination's QMP socket; it was started with -incoming defer")
    ap.add_argument("--live", action="store_true",
                    help="accepted for virsh users: pyvm's precopy always runs the guest")
    ap.add_argument("-v", "--verbose", action="store_true", help="show progress")
    ap.add_argument("--cap", action="append", default=[], type=lambda t: _kv(t, "--cap"),
                    metavar="NAME=on|off", help="set a capability on both sides (repeatable)")
    ap.add_argument("--param", action="append", default=[], type=lambda t: _kv(t, "--param"),
                    metavar="NAME=VALUE",
                    help="set a migration parameter (repeatable; sizes may end in K, M, G)")
    ap.add_argument("--interval", type=float, default=0.1, help="sampling period in seconds")
    ap.add_argument("--timeout", type=float, default=0.0,
                    help="cancel the migration after this many seconds (0: never)")
    ap.add_argument("--pagemap", action="store_true", help="show the source RAM's page map")
    ap.add_argument("--history", metavar="FILE", help="write the query-migrate samples (JSON)")
    ap.add_argument("--figures", metavar="DIR", help="write PNG figures of the migration")
    return ap.parse_args(argv)


class Display:
    """Progress output: a rich live view on a terminal, plain lines elsewhere."""

    def __init__(self, verbose: bool, pagemap: bool) -> None:
        from rich.console import Console
        self.console = Console(highlight=False, soft_wrap=True)
        self.verbose = verbose
        self.pagemap = pagemap
        self.live: Any = None
        self.last_round = -1
        if self.console.is_terminal and (verbose or pagemap):
            from rich.live import Live
            self.live = Live(console=self.console, refresh_per_second=10, transient=False)
            self.live.start()

    def update(self, info: dict[str, Any], pages: dict[str, Any] | None) -> None:
        ram = info.get("ram", {})
        rnd = ram.get("dirty-sync-count", 0)
        if self.live is not None:
            from rich.console import Group
            parts: list[Any] = [self._bar(info)]
            if pages is not None:
                parts.append(self._map(pages))
            self.live.update(Group(*parts))
        elif rnd != self.last_round and ram:
            if self.verbose:
                self.console.print(_round_line(info))
            if pages is not None:
                self.console.print(f"round {rnd}: page map ({pages['pages-per-cell']} pages "
                                   f"per character)")
                self.console.print(self._map(pages))
        self.last_round = rnd

    def _bar(self, info: dict[str, Any]) -> Any:
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        ram = info.get("ram", {})
        total = max(ram.get("total", 0), 1)
        done = total - ram.get("remaining", total)
        grid = Table.grid(padding=(0, 1))
        grid.add_row(f"[bold]{info.get('status', '?')}[/]",
                     ProgressBar(total=total, completed=done, width=30),
                     f"{100 * done // total:3d} %", _round_line(info))
        return grid

    def _map(self, pages: dict[str, Any]) -> Any:
        from rich.text import Text
        styles = {".": "dim", "z": "blue", "s": "green", "p": "yellow", "d": "bold red"}
        width = map_width(self.console)
        text = Text()
        cells = pages["map"]
        for i in range(0, len(cells), width):
            for ch in cells[i:i + width]:
                text.append(ch, style=styles.get(ch, ""))
            text.append("\n")
        text.append(". clean  z zero  s sent  p pending this round  d dirtied since the sync",
                    style="italic")
        return text

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()


def map_width(console: Any) -> int:
    """Characters per page-map row: the terminal's width, 64 when not a terminal."""
    return max(16, min(console.width, 128) - 1) if console.is_terminal else 64


def _round_line(info: dict[str, Any]) -> str:
    ram = info.get("ram", {})
    return (f"round {ram.get('dirty-sync-count', 0)}: "
            f"transferred {ram.get('transferred', 0) / MIB:.1f} MiB, "
            f"remaining {ram.get('remaining', 0) / MIB:.1f} MiB, "
            f"{ram.get('mbps', 0.0):.0f} Mbps, "
            f"expected downtime {info.get('expected-downtime', 0)} ms"
            + (f", cpu throttle {info['cpu-throttle-percentage']}%"
               if "cpu-throttle-percentage" in info else ""))


def run(args: argparse.Namespace) -> int:
    src = connect(args.source)
    dst = connect(args.dest) if args.dest else None
    caps = [{"capability": name, "state": _param_value(v) is True} for name, v in args.cap]
    if caps:
        command(src, "migrate-set-capabilities", capabilities=caps)
        if dst is not None:
            command(dst, "migrate-set-capabilities", capabilities=caps)
    if args.param:
        command(src, "migrate-set-parameters",
                **{name: _param_value(v) for name, v in args.param})
    if dst is not None:
        command(dst, "migrate-incoming", uri=args.uri)
    cells = 0
    display = Display(args.verbose, args.pagemap)
    if args.pagemap:
        cells = map_width(display.console) * (16 if display.live else 4)
    history: list[dict[str, Any]] = []
    start = time.monotonic()
    command(src, "migrate", uri=args.uri)
    try:
        while True:
            info = command(src, "query-migrate")
            info["t"] = round(time.monotonic() - start, 4)
            history.append(info)
            pages = command(src, "x-query-ram-pagemap", cells=cells) if args.pagemap else None
            display.update(info, pages)
            if info.get("status") in DONE:
                break
            if args.timeout and time.monotonic() - start > args.timeout:
                command(src, "migrate_cancel")
                args.timeout = 0
            time.sleep(args.interval)
    finally:
        display.close()
    status = info.get("status")
    print(str(command(src, "human-monitor-command", **{"command-line": "info migrate"}))
          .replace("\r\n", "\n"), end="")
    if status == "failed":
        print(f"pyvm-migrate: migration failed: {info.get('error-desc', 'unknown error')}",
              file=sys.stderr)
    if dst is not None and status == "completed":
        print(f"destination: {_wait_destination(dst)}")
    if args.history:
        Path(args.history).write_text(json.dumps(history, indent=1) + "\n")
        print(f"history: {len(history)} samples in {args.history}")
    if args.figures:
        from pyvm.migration_figures import write_figures
        for path in write_figures(history, Path(args.figures)):
            print(f"figure: {path}")
    close(src)
    if dst is not None:
        close(dst)
    return 0 if status == "completed" else 1


def _wait_destination(dst: Any, timeout: float = 30.0) -> str:
    """The destination's run state once it left ``inmigrate``."""
    deadline = time.monotonic() + timeout
    while True:
        state = str(command(dst, "query-status")["status"])
        if state != "inmigrate" or time.monotonic() > deadline:
            return state
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        return run(args)
    except ToolError as err:
        print(f"pyvm-migrate: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
