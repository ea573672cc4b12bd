"""Serial output across a live migration: every byte the guest writes to COM1 comes out
exactly once, on the source before the switchover or on the destination after it.

The guest (firmware/serial-stream.s) prints "1", "2", "3", ... without pause, each byte
as soon as LSR shows THR empty; so the source's and the destination's output together
must be exactly that sequence, cut anywhere."""

from __future__ import annotations

import array
import fcntl
import socket
import termios
from pathlib import Path

import pytest

from tests.conftest import guest
from tests.vmproc import VmProcess
from tests.waiting import wait_stalled, wait_until

pytestmark = pytest.mark.slow

STREAM = ["-m", "32M", "-kernel", guest("serial-stream.elf"), "-display", "none"]


def _check_sequence(text: str, first: int | None = 1) -> int:
    """The number of the last whole line in ``text``, which must be "1\\r\\n2\\r\\n..."
    up to a line cut anywhere; fails naming the first place where it is not.  With
    ``first=None`` the text may begin anywhere in the sequence (a client that connected
    late): it is checked from its first whole line on."""
    if first is None:
        text = text[text.index("\r\n") + 2:]
        first = int(text[:text.index("\r\n")])
    lines = text.split("\r\n")
    for i, line in enumerate(lines[:-1]):
        assert line == str(first + i), \
            f"line {first + i} is {line!r}; around it: {lines[max(i - 3, 0):i + 3]}"
    assert f"{first + len(lines) - 1}\r".startswith(lines[-1]), f"cut line {lines[-1]!r}"
    return first + len(lines) - 2


def _migrate(src: VmProcess, dst: VmProcess) -> None:
    port = dst.cmd("query-migrate")["socket-address"][0]["port"]
    # slow enough for a few rounds while the guest prints
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 4 << 20})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    done = src.wait_migration(timeout=60)
    assert done["status"] == "completed", done
    assert dst.wait_migration(("completed", "failed"), timeout=30)["status"] == "completed"


def test_output_is_cut_between_source_and_destination_without_loss(vms) -> None:
    src = vms("src", *STREAM)
    src.wait_serial("\r\n1000\r\n")
    dst = vms("dst", *STREAM, "-incoming", "tcp:127.0.0.1:0")
    _migrate(src, dst)
    before = _check_sequence(src.serial())
    wait_until(lambda: dst.serial().count("\r\n") >= 2000, 60, "dst: 2000 lines")
    after = _check_sequence(src.serial() + dst.serial())
    assert after >= before + 2000


def _queued(sock: socket.socket) -> int:
    """Bytes waiting in ``sock``'s receive queue (FIONREAD, Linux unix(7))."""
    buf = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf)
    return buf[0]


def test_a_console_client_that_does_not_read_holds_neither_guest_nor_migration(
        vms, tmp_path: Path) -> None:
    """The client of the source's serial socket stops reading: the socket fills up and
    the guest waits for THR (it must not block the vCPU thread, which would stall the
    migration for good).  The bytes still in the UART's transmit FIFO at the switchover
    travel in its state and the destination sends them: with what the client then reads,
    the output is whole."""
    path = tmp_path / "src.serial.sock"
    src = vms("src", *STREAM, "-serial", f"unix:{path},server=on,wait=off", serial=False)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        wait_until(lambda: client.connect_ex(str(path)) == 0, 20, "serial socket")
        wait_until(lambda: _queued(client) > 0, 20, "serial output")
        wait_stalled(lambda: _queued(client), 60, "the socket filling up", interval=0.5)
        dst = vms("dst", *STREAM, "-incoming", "tcp:127.0.0.1:0")
        _migrate(src, dst)
        out = bytearray()
        client.setblocking(False)
        while True:                 # the source is stopped: read what it sent, to the end
            try:
                data = client.recv(65536)
            except BlockingIOError:
                break
            assert data, "the source closed its serial socket"
            out += data
        before = _check_sequence(out.decode(), None)
        wait_until(lambda: dst.serial().count("\r\n") >= 1000, 60, "dst: 1000 lines")
        after = _check_sequence(out.decode() + dst.serial(), None)
        assert after >= before + 1000
    finally:
        client.close()
