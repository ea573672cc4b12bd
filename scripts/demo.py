"""pyvm's demo: boot the default guest, watch it run, talk to it, drive it over QMP.

    make demo          (or: .venv/bin/python scripts/demo.py)

It starts ``pyvm`` as a user would (``python -m pyvm`` with no boot option boots the
packaged ``hello`` guest), reads the guest's serial console, types a line that the guest
echoes back, asks the QMP monitor for the run state with QEMU's own client library, and
quits through QMP.  Add ``--interactive`` to get the guest on your terminal instead
(Ctrl-A x quits).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time

from qemu.qmp import QMPClient


def reader(proc: subprocess.Popen, sink: list[bytes]) -> None:
    assert proc.stdout is not None
    while True:
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            return
        sink.append(chunk)
        sys.stdout.write(chunk.decode(errors="replace").replace("\n", "\n    | "))
        sys.stdout.flush()


def wait_for(sink: list[bytes], text: bytes, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if text in b"".join(sink):
            return
        time.sleep(0.05)
    raise SystemExit(f"demo: the guest did not print {text!r} within {timeout} s")


async def qmp_session(path: str) -> None:
    qmp = QMPClient("demo")
    await qmp.connect(path)
    version = qmp.greeting.QMP.version            # a dict, as QEMU sends it
    q = version["qemu"]
    print(f"\n[demo] QMP greeting: {version['package']} speaks QEMU "
          f"{q['major']}.{q['minor']}.{q['micro']}'s API")
    status = await qmp.execute("query-status")
    print(f"[demo] query-status -> {status}")
    await qmp.execute("stop")
    print(f"[demo] after 'stop':  {await qmp.execute('query-status')}")
    await qmp.execute("cont")
    print(f"[demo] after 'cont':  {await qmp.execute('query-status')}")
    print("[demo] quitting through QMP ('quit')")
    await qmp.execute("quit")
    try:
        await qmp.disconnect()
    except EOFError:
        pass            # pyvm closed the connection first, as QEMU may after 'quit'


def main() -> int:
    if "--interactive" in sys.argv:
        return subprocess.call([sys.executable, "-m", "pyvm", "-nographic"])
    tmp = tempfile.mkdtemp(prefix="pyvm-demo-")
    qmp_path = os.path.join(tmp, "qmp.sock")
    cmd = [sys.executable, "-m", "pyvm", "-m", "64M", "-serial", "stdio",
           "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    print("[demo] starting:", " ".join(["pyvm"] + cmd[3:]))
    print("[demo] the guest's serial console (COM1):\n    | ", end="")
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out: list[bytes] = []
    t = threading.Thread(target=reader, args=(proc, out), daemon=True)
    t.start()
    try:
        wait_for(out, b"tick 2", 15)
        assert proc.stdin is not None
        proc.stdin.write(b"hello from the host\r")
        proc.stdin.flush()
        wait_for(out, b"hello from the host", 5)
        asyncio.run(qmp_session(qmp_path))
        code = proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    t.join(2)
    print(f"\n[demo] pyvm exited with status {code}: the guest booted, ticked on its timer "
          "interrupts, echoed what we typed, and obeyed QMP.")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
