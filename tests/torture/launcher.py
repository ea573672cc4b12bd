"""Start pyvm processes by forking a process that has imported pyvm already (torture suite).

Most of a pyvm process's start-up is Python importing pyvm, numpy, unicorn, asyncio and
the QMP tables; the torture suite starts hundreds of short-lived VMs (R4 starts one per
hop), so it starts them from a *launcher*: a single-threaded process that imports pyvm
once and then forks one child per request.  Each child is an ordinary, separate pyvm
process running ``pyvm.cli.main(argv)`` with its own stdout, stderr, environment and
working directory; only the import work is shared.  The launcher reaps its children and
reports each exit status back, so :class:`LaunchedProcess` offers what tests use of
:class:`subprocess.Popen` (``pid``, ``poll``, ``wait``, ``kill``, ``returncode``).

Protocol on the launcher's control socket (unix seqpacket): per child, one message of JSON
``{"argv": [...], "env": {...}, "cwd": "..."}`` carrying three descriptors (SCM_RIGHTS):
the child's stdout, its stderr and the driver's end of a status socketpair.  On the status
socket the launcher writes the child's pid (8 bytes, big-endian) and, once reaped, its
exit code as :func:`os.waitstatus_to_exitcode` gives it (8 bytes, signed).
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
_MAX_REQUEST = 1 << 20


class LaunchedProcess:
    """The driver's handle on one forked pyvm process (the Popen subset tests use)."""

    def __init__(self, status: socket.socket) -> None:
        self._status = status
        self.pid = struct.unpack(">q", _recv_exact(status, 8, None))[0]
        self.returncode: int | None = None

    def _collect(self, timeout: float | None) -> None:
        if self.returncode is not None:
            return
        data = _recv_exact(self._status, 8, timeout)
        self.returncode = struct.unpack(">q", data)[0]
        self._status.close()

    def poll(self) -> int | None:
        try:
            self._collect(0)
        except TimeoutError:
            pass
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        try:
            self._collect(timeout)
        except TimeoutError:
            raise subprocess.TimeoutExpired(["pyvm"], timeout or 0) from None
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:          # not reaped yet: the pid is still this child's
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)


def _recv_exact(sock: socket.socket, n: int, timeout: float | None) -> bytes:
    data = b""
    while len(data) < n:
        ready, _, _ = select.select([sock], [], [], timeout)
        if not ready:
            raise TimeoutError
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the pyvm launcher went away")
        data += chunk
    return data


class Launcher:
    """The launcher process; :meth:`spawn` forks a pyvm, :meth:`close` ends the launcher
    (children still running keep running; their owners kill them)."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._control = ours
        self._lock = threading.Lock()
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.torture.launcher",
                                      str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                     cwd=ROOT, stdin=subprocess.DEVNULL)
        theirs.close()

    def spawn(self, argv: list[str], stdout: int, stderr: int, env: dict[str, str],
              cwd: str | os.PathLike[str] = ROOT) -> LaunchedProcess:
        status, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        request = json.dumps({"argv": argv, "env": env, "cwd": str(cwd)}).encode()
        try:
            with self._lock:
                socket.send_fds(self._control, [request], [stdout, stderr, child_end.fileno()])
        finally:
            child_end.close()
        return LaunchedProcess(status)

    def close(self) -> None:
        self._control.close()          # the launcher sees EOF and exits
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


# -- the launcher process -------------------------------------------------------------------------

def _preload() -> Any:
    """Import what a pyvm process with a monitor and migration imports."""
    import pyvm.cli
    import pyvm.migration.control.monitor_commands  # noqa: F401
    import pyvm.migration.control.service  # noqa: F401
    import pyvm.qmp.core  # noqa: F401
    import pyvm.qmp.server  # noqa: F401
    assert threading.active_count() == 1, "a thread started at import: forking is unsafe"
    return pyvm.cli.main


def _child(main: Any, request: dict[str, Any], fds: list[int], keep_closed: list[int]) -> None:
    """In the forked child: become the pyvm process the request describes."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in keep_closed:
            os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(fds[0], 1)
        os.dup2(fds[1], 2)
        for fd in (devnull, *fds):
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["pyvm", *request["argv"]]
        code = main(list(request["argv"]))
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    except BaseException:  # noqa: B902 - reported on the child's stderr like an uncaught one
        import traceback
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - nothing to report to
                pass
        os._exit(code)


def serve(control_fd: int) -> None:
    main = _preload()
    control = socket.socket(fileno=control_fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda _sig, _frame: None)
    children: dict[int, socket.socket] = {}
    open_ = True
    while open_ or children:
        watch = [wake_r] + ([control] if open_ else [])
        ready, _, _ = select.select(watch, [], [])
        if wake_r in ready:
            os.read(wake_r, 4096)
        while children:
            pid, wstatus = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            status = children.pop(pid, None)
            if status is not None:
                try:
                    status.sendall(struct.pack(">q", os.waitstatus_to_exitcode(wstatus)))
                except OSError:
                    pass
                status.close()
        if open_ and control in ready:
            data, fds, _flags, _addr = socket.recv_fds(control, _MAX_REQUEST, 3)
            if not data:
                open_ = False
                control.close()
                continue
            request = json.loads(data)
            pid = os.fork()
            if pid == 0:
                _child(main, request, fds[:2],
                       [control.fileno(), wake_r, wake_w, fds[2],
                        *(s.fileno() for s in children.values())])
            status = socket.socket(fileno=fds[2])
            for fd in fds[:2]:
                os.close(fd)
            status.sendall(struct.pack(">q", pid))
            children[pid] = status


if __name__ == "__main__":
    serve(int(sys.argv[1]))
