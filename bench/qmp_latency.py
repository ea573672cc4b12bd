"""QMP round-trip rate of pyvm's monitor next to a bare asyncio JSON echo server.

Starts ``python -m pyvm`` with a busy guest (store-loop: it stores to 8 MiB of RAM in an
endless loop) and a QMP unix socket, then sends ``query-status`` on one connection, one
request at a time, for a fixed time.  In the same run it measures the same client
against a minimal asyncio server (another process) that parses each JSON line and writes
``{"return": ...}`` back, and prints both rates and their ratio.

    .venv/bin/python bench/qmp_latency.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = os.path.join(ROOT, "pyvm", "guests", "store-loop.elf")
REQUEST = b'{"execute": "query-status"}\n'


class LineClient:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.buf = b""

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("server closed the connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def call(self, request: bytes) -> dict[str, Any]:
        self.sock.sendall(request)
        while True:
            msg: dict[str, Any] = json.loads(self.line())
            if "event" not in msg:
                return msg


def wait_for_path(path: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise SystemExit(f"server did not start: {err}")
        time.sleep(0.02)


def measure(client: LineClient, seconds: float) -> float:
    for _ in range(200):                              # warm up
        client.call(REQUEST)
    count = 0
    start = time.perf_counter()
    end = start + seconds
    while True:
        reply = client.call(REQUEST)
        assert "return" in reply, reply
        count += 1
        if count % 64 == 0 and time.perf_counter() >= end:
            break
    return count / (time.perf_counter() - start)


def echo_server(path: str) -> None:
    """The baseline: parse a JSON line, answer {"return": <it>} (asyncio streams)."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(json.dumps({"return": json.loads(line)}).encode() + b"\r\n")
            await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_unix_server(handle, path)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def bench_pyvm(tmp: str, seconds: float) -> tuple[float, int]:
    path = os.path.join(tmp, "pyvm.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyvm", "-display", "none", "-m", "64", "-kernel", GUEST,
         "-append", "start=1 size=8", "-qmp", f"unix:{path},server=on,wait=off"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_path(path, proc)
        client = LineClient(path)
        client.line()                                     # greeting
        client.call(b'{"execute": "qmp_capabilities"}\n')
        deadline = time.monotonic() + 10
        while not client.call(REQUEST)["return"]["running"]:
            if time.monotonic() > deadline:
                raise SystemExit("the guest did not start")
            time.sleep(0.05)
        rate = measure(client, seconds)
        status = client.call(REQUEST)["return"]["status"]
        assert status == "running", status
        xp = json.dumps({"execute": "human-monitor-command",
                         "arguments": {"command-line": "xp /1dw 0x100000"}}).encode() + b"\n"
        passes = int(client.call(xp)["return"].split(":")[1])
        client.call(b'{"execute": "quit"}\n')
        proc.wait(20)
        return rate, passes
    finally:
        if proc.poll() is None:
            proc.kill()


def bench_echo(tmp: str, seconds: float) -> float:
    path = os.path.join(tmp, "echo.sock")
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--echo-server", path],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_path(path, proc)
        return measure(LineClient(path), seconds)
    finally:
        proc.kill()
        proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    parser.add_argument("--echo-server", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        echo_server(args.echo_server)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        echo = bench_echo(tmp, args.seconds)
        pyvm_rate, passes = bench_pyvm(tmp, args.seconds)
    print(f"bare asyncio JSON echo server : {echo:10.0f} round trips/s")
    print(f"pyvm query-status, guest runs : {pyvm_rate:10.0f} round trips/s "
          f"(guest completed {passes} passes over 8 MiB meanwhile)")
    print(f"ratio pyvm / echo             : {pyvm_rate / echo:10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
