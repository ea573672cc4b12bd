"""Linux's serial console across a live migration: the 8250 driver transmits from its
THRE interrupt (up to 16 bytes a time), so this carries the UART's interrupt state, not
only its registers, through the switchover.  A shell loop prints numbered lines while
the migration runs, and the console client does not read meanwhile: the source's socket
fills up, the UART keeps what the socket did not take in its transmit FIFO and the driver
waits for THRE.  The migration must still complete (a vCPU blocked writing to the socket
would stall it), and what the client then reads from the source, and from the
destination, must be every line exactly once and in order.

Read the source's console to the end: the source keeps what it sent before the
switchover in the client's socket until the client reads it (a test that stops reading
after typing sees that output on neither side)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.linux import BOOT_TIMEOUT, PROMPT, SerialConsole, linux_args

pytestmark = [pytest.mark.slow, pytest.mark.linux]
START_TIMEOUT = 120.0


def _vm(vms, name: str, tmp_path: Path, *extra: str):
    sock = tmp_path / f"{name}.serial.sock"
    vm = vms(name, *linux_args("256M"), *extra, "-serial", f"unix:{sock},server=on,wait=off",
             serial=False, connect_timeout=START_TIMEOUT)
    return vm, SerialConsole(sock)


def test_console_lines_printed_during_migration_arrive_exactly_once(vms, tmp_path: Path) -> None:
    src, scon = _vm(vms, "src", tmp_path)
    scon.expect(PROMPT, BOOT_TIMEOUT)
    dst, dcon = _vm(vms, "dst", tmp_path, "-incoming", "tcp:127.0.0.1:0")
    port = dst.cmd("query-migrate")["socket-address"][0]["port"]
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 20, "downtime-limit": 300})
    mark = len(scon.out)
    scon.sock.sendall(b"i=0; while :; do echo L$i; i=$((i+1)); done\r")
    scon.expect("\nL300\r\n", 60, mark)
    # the client stops reading: the socket fills up and the driver waits for THRE
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    done = src.wait_migration(timeout=120)
    assert done["status"] == "completed", done
    assert dst.wait_migration(("completed", "failed"), timeout=60)["status"] == "completed"
    scon.sock.setblocking(False)
    while True:                 # the source is stopped: what it sent, to the end
        try:
            data = scon.sock.recv(65536)
        except BlockingIOError:
            break
        assert data, "the source closed its serial socket"
        scon.out += data.decode(errors="replace")
    last_src = int(re.findall(r"\nL(\d+)\r\n", scon.out)[-1])
    dcon.expect(f"\nL{last_src + 500}\r\n", 120)
    nums = [int(n) for n in re.findall(r"^L(\d+)\r$", scon.out[mark:] + dcon.out, re.M)]
    gaps = [(a, b) for a, b in zip(nums, nums[1:]) if b != a + 1]
    assert nums[0] == 0 and not gaps, f"lines out of sequence: {gaps[:5]}"
    scon.close()
    dcon.close()
