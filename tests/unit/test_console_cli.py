"""pyvm-console's scripted mode against a scripted shell on the other end of a real unix
socket (lab 9 runs it against Debian's busybox in a real guest)."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from pyvm import console_cli

PROMPT = "pyvm-linux:/# "
#: wrapped at 30 columns, its first piece ends in "> " like a prompt
WRAPPED = 'echo "' + "x" * 22 + '> tail"'


def _shell(listener: socket.socket, answers: dict[str, str], log: list[str],
           wrap: int = 30) -> None:
    """Echo each typed line (wrapped like busybox's line editor, with a cursor query after
    each prompt, split across writes) and answer it."""
    conn, _ = listener.accept()
    with conn:
        buf = b""
        while True:
            data = conn.recv(1024)
            if not data:
                return
            buf += data
            while b"\r" in buf:
                raw, buf = buf.split(b"\r", 1)
                line = raw.decode()
                log.append(line)
                echo = "\r\n".join(line[i:i + wrap] for i in range(0, len(line), wrap))
                conn.sendall((echo + "\r\n").encode())
                if line in answers:
                    conn.sendall(answers[line].encode() + b"\r\n")
                conn.sendall(PROMPT.encode() + b"\x1b[")
                conn.sendall(b"6n")


@pytest.fixture
def shell(tmp_path: Path):
    path = tmp_path / "console.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    log: list[str] = []
    answers = {"uname -sr": "Linux 6.1.0-57-amd64",
               WRAPPED: "the answer"}
    thread = threading.Thread(target=_shell, args=(listener, answers, log))
    thread.start()
    yield path, log
    thread.join(10)
    listener.close()


def test_types_lines_and_prints_answers_without_control_sequences(shell, capsys) -> None:
    path, log = shell
    line = WRAPPED
    assert console_cli.main([str(path), "--wake", "--type", "uname -sr", "--type", line]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out
    assert f"{PROMPT}uname -sr\nLinux 6.1.0-57-amd64\n" in out
    # the wrapped echo contains "> " at a line end: not a prompt; the answer came after it
    assert out.endswith(f"> \ntail\"\nthe answer\n{PROMPT}\n")
    assert log[0] == "" and log[-2:] == ["uname -sr", line]


def test_until_and_timeout(shell, capsys) -> None:
    path, _ = shell
    assert console_cli.main([str(path), "--type", "uname -sr", "--until", "never there",
                             "--timeout", "0.5"]) == 1
    err = capsys.readouterr().err
    assert "pyvm-console: 'never there' not seen within 0.5 s" in err


def test_no_listener_is_one_line(tmp_path: Path, capsys) -> None:
    assert console_cli.main([str(tmp_path / "none.sock"), "--wake", "--timeout", "0.3"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("pyvm-console: cannot connect to ") and "\n" not in err


@pytest.mark.parametrize("text,line,end", [
    ("x\nabc\n", "abc", 5), ("ab\nc", "abc", 4), ("abd abc", "abc", 7), ("ab", "abc", None),
    ("", "", None), ("p# ", "", 0)])
def test_echo_end(text: str, line: str, end: int | None) -> None:
    assert console_cli._echo_end(text, line) == end
