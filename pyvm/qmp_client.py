"""Connecting pyvm's command-line tools to a running VM's QMP socket.

The tools (``pyvm-monitor``, ``pyvm-migrate``) use QEMU's own client library,
``qemu.qmp``, in its synchronous form.  An address is a Unix socket path (optionally
``unix:PATH``) or ``HOST:PORT`` (optionally ``tcp:HOST:PORT``), as ``-qmp`` takes them.
"""

from __future__ import annotations

import os
import time
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol
from qemu.qmp.protocol import ConnectError


class ToolError(Exception):
    """A failure a tool reports in one line (no traceback)."""


def parse_address(text: str) -> str | tuple[str, int]:
    if text.startswith("unix:"):
        return text[5:].split(",")[0]
    if text.startswith("tcp:"):
        text = text[4:].split(",")[0]
    elif os.path.exists(text) or ":" not in text:
        return text
    host, _, port = text.rpartition(":")
    if not port.isdigit():
        raise ToolError(f"'{text}' is neither a socket path nor HOST:PORT")
    return host or "localhost", int(port)


def connect(text: str, timeout: float = 10.0) -> QEMUMonitorProtocol:
    """Connect (retrying until ``timeout`` while the VM is still starting)."""
    address = parse_address(text)
    deadline = time.monotonic() + timeout
    while True:
        qmp = QEMUMonitorProtocol(address)
        try:
            qmp.connect()
            return qmp
        except (OSError, ConnectError) as err:
            if time.monotonic() > deadline:
                raise ToolError(f"cannot connect to QMP at {text}: {err}") from err
        time.sleep(0.1)


def command(qmp: QEMUMonitorProtocol, name: str, **args: Any) -> Any:
    """Run a QMP command; a QMP error becomes :class:`ToolError` with QEMU's text."""
    resp = qmp.cmd_raw(name, args or None)
    if "error" in resp:
        raise ToolError(f"{name}: {resp['error']['desc']}")
    return resp["return"]


def close(qmp: QEMUMonitorProtocol) -> None:
    """Disconnect; a VM that already went away (``quit``) is not an error."""
    try:
        qmp.close()
    except (EOFError, OSError, ConnectError):
        pass
