"""Every command of every lab page (and of the README's walkthroughs) runs, and its
output is checked against the page: the labs cannot rot.  See tests/labs/labdoc.py for
the markup."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.labs.labdoc import Step, match_lines, pages, steps

ROOT = Path(__file__).resolve().parents[2]
COMMAND_TIMEOUT = 900.0       # a bound on hangs; lab 9 boots Linux (minutes under load)
WAIT_TIMEOUT = 60.0


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # the page's commands are the installed ones: pyvm, pyvm-monitor, pyvm-migrate ...
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["COLUMNS"] = "100"
    env.pop("PYTHONPATH", None)
    return env


class PageRun:
    def __init__(self, page: Path, workdir: Path) -> None:
        self.page = page
        self.workdir = workdir
        self.env = _env()
        self.background: list[tuple[subprocess.Popen[bytes], Path]] = []

    def where(self, step: Step) -> str:
        return f"{self.page.relative_to(ROOT)}:{step.line}: $ {step.command}"

    def run(self, step: Step) -> None:
        if step.background:
            self._start(step)
        else:
            self._foreground(step)

    def _foreground(self, step: Step) -> None:
        try:
            res = subprocess.run(["bash", "-c", step.command], cwd=self.workdir, env=self.env,
                                 capture_output=True, timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.where(step)}: still running after {COMMAND_TIMEOUT} s")
        out = (res.stdout + res.stderr).decode(errors="replace")
        assert res.returncode == 0, f"{self.where(step)}: exit status {res.returncode}\n{out}"
        missing = match_lines(step.expected, out)
        assert missing is None, (f"{self.where(step)}: expected line not found: {missing!r}\n"
                                 f"--- output ---\n{out}")

    def _start(self, step: Step) -> None:
        log = self.workdir / f".bg{len(self.background)}.log"
        f = open(log, "wb")
        proc = subprocess.Popen(["bash", "-c", "exec " + step.command], cwd=self.workdir,
                                env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        f.close()
        self.background.append((proc, log))
        deadline = time.monotonic() + WAIT_TIMEOUT
        while True:
            out = log.read_bytes().decode(errors="replace")
            if match_lines(step.expected, out) is None:
                return
            if proc.poll() is not None or time.monotonic() > deadline:
                missing = match_lines(step.expected, log.read_bytes().decode(errors="replace"))
                if missing is None:
                    return
                pytest.fail(f"{self.where(step)}: never printed {missing!r} "
                            f"(exit status {proc.poll()})\n--- output ---\n{out}")
            time.sleep(0.05)

    def close(self) -> None:
        for proc, _ in self.background:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@pytest.mark.slow
@pytest.mark.parametrize("page", pages(ROOT), ids=lambda p: p.name)
def test_page_commands(page: Path, tmp_path: Path) -> None:
    todo = steps(page.read_text())
    if page.name != "README.md":
        assert todo, f"{page} has no console block"
    run = PageRun(page, tmp_path)
    try:
        for step in todo:
            run.run(step)
    finally:
        run.close()


def test_markup_parser() -> None:
    text = "\n".join([
        "```console", "$ echo a \\", "  b", "a b", "$ sleep 100 &", "ready", "```",
        "```sh", "$ not run", "```", "```console", "$ true", "$ cat > f <<'EOF'", "x", "$ y",
        "EOF", "$ cat f", "x", "```"])
    got = steps(text)
    assert [(s.command, s.background, s.expected) for s in got] == [
        ("echo a \\\n  b", False, ["a b"]), ("sleep 100", True, ["ready"]), ("true", False, []),
        ("cat > f <<'EOF'\nx\n$ y\nEOF", False, []), ("cat f", False, ["x"])]
    assert match_lines(["x ... z", "...", "end"], "w\nx y z\nmid\nend\n") is None
    assert match_lines(["end", "x ... z"], "x y z\nend\n") == "x ... z"
