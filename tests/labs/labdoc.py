"""The runnable parts of a lab page (or the README): ```console blocks.

Markup (described for authors in docs/labs/README.md):

- Only fenced blocks whose info string is exactly ``console`` run.
- ``$ CMD`` is a command, run by bash in the page's scratch directory; a line ending in
  ``\\`` continues on the next line.
- The lines after a command, up to the next ``$ ``, are its expected output: each must
  match a line of the real output, in order (other output lines may come between).
  ``...`` inside a line matches any text; a line that is only ``...`` is not checked.
- ``$ CMD &`` starts CMD in the background; the lines after it are awaited: each must
  appear in that process's output (in order) within the wait time before the page
  goes on.  Background processes are killed when the page ends.
- A command ending in a here-document (``<<'EOF'``) takes the lines up to ``EOF``.
- A foreground command must exit with status 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path


HEREDOC = re.compile(r"<<-?'?([A-Za-z_]+)'?\s*$")


@dataclass
class Step:
    command: str
    background: bool
    expected: list[str] = field(default_factory=list)
    line: int = 0               # where the command starts in the page (1-based)


def steps(text: str) -> list[Step]:
    out: list[Step] = []
    in_block = False
    fence: str | None = None
    heredoc: str | None = None
    current: Step | None = None
    pending_cmd: list[str] = []
    start = 0
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            # an opening fence starts a block (runnable only if "console"); the next closes it
            if fence is None:
                fence = "console" if line.strip() == "```console" else "other"
            else:
                fence = None
            in_block = fence == "console"
            current = None
            continue
        if not in_block:
            continue
        if heredoc is not None:
            pending_cmd.append(line)
            if line == heredoc:
                heredoc = None
                current = _make(pending_cmd, start)
                out.append(current)
                pending_cmd = []
            continue
        if pending_cmd:
            pending_cmd.append(line)
            if not line.endswith("\\"):
                current = _make(pending_cmd, start)
                out.append(current)
                pending_cmd = []
            continue
        if line.startswith("$ "):
            pending_cmd = [line[2:]]
            start = lineno
            here = HEREDOC.search(line)
            if here:
                heredoc = here.group(1)
                continue
            if not line.endswith("\\"):
                current = _make(pending_cmd, start)
                out.append(current)
                pending_cmd = []
            continue
        if current is not None and line.strip():
            current.expected.append(line)
    return out


def _make(lines: list[str], start: int) -> Step:
    cmd = "\n".join(lines).strip()
    background = cmd.endswith(" &")
    if background:
        cmd = cmd[:-2].rstrip()
    return Step(cmd, background, line=start)


def _pattern(expected: str) -> re.Pattern[str]:
    parts = expected.strip().split("...")
    return re.compile(r"\s*" + ".*".join(re.escape(p) for p in parts) + r"\s*")


def match_lines(expected: list[str], output: str) -> str | None:
    """None when every expected line matches, in order; else the first that does not."""
    lines = output.splitlines()
    pos = 0
    for exp in expected:
        if exp.strip() == "...":
            continue
        pat = _pattern(exp)
        while pos < len(lines) and not pat.fullmatch(lines[pos]):
            pos += 1
        if pos == len(lines):
            return exp
        pos += 1
    return None


def pages(root: Path) -> list[Path]:
    labs = sorted((root / "docs" / "labs").glob("[0-9]*.md"))
    return [root / "README.md", *labs]
