"""Exec transport: ``exec:CMDLINE`` (run by ``/bin/sh -c``) and the ``exec`` channel's argv.

The source writes the stream to the command's standard input; the destination reads it from
the command's standard output.  The command's other standard stream is ``/dev/null`` and its
standard error is pyvm's.  The command runs in a process group of its own, so that
``shutdown()`` (``migrate_cancel``) can stop a whole pipeline (``gzip | ssh ...``), not only the
shell.

Failures: a command that ends early makes the next write fail with QEMU's text
(``Unable to write to command: Broken pipe``); ``close()`` waits for the command and reports a
non-zero exit status or a fatal signal (``Command 'false' exited with status 1``), which QEMU
does not check but pyvm does, so that a command that failed to store the stream is never taken
for a completed migration.
"""

from __future__ import annotations

import fcntl
import os
import shlex
import signal
import subprocess
import sys
from typing import Sequence

from pyvm.migration.transports.base import (FdIncoming, FdOutgoing, TransportError, fresh,
                                            os_error)

# Pipe capacity asked for (F_SETPIPE_SZ); 1 MiB is Linux's default /proc/sys/fs/pipe-max-size.
PIPE_SIZE = 1 << 20

# How long a command that pyvm no longer needs gets between SIGTERM and SIGKILL.
KILL_GRACE_SECONDS = 1.0


def shell_argv(cmdline: str) -> list[str]:
    """What ``exec:CMDLINE`` runs (QEMU: ``/bin/sh -c CMDLINE``)."""
    return ["/bin/sh", "-c", cmdline]


def command_display(argv: Sequence[str]) -> str:
    """The command as the user wrote it: the shell command line, or the argv joined."""
    if len(argv) == 3 and list(argv[:2]) == ["/bin/sh", "-c"]:
        return argv[2]
    return shlex.join(argv)


class _Command:
    """A spawned command with one pipe end held by pyvm."""

    def __init__(self, argv: Sequence[str], *, writes_stdin: bool) -> None:
        argv = list(argv)
        if not argv:
            raise TransportError("exec: empty command")
        self.display = command_display(argv)
        read_end, write_end = os.pipe()
        ours, theirs = (write_end, read_end) if writes_stdin else (read_end, write_end)
        try:
            fcntl.fcntl(ours, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass                             # capacity is tuning only
        # A process group of its own: killpg() reaches every process of a pipeline.
        group: dict[str, object] = ({"process_group": 0} if sys.version_info >= (3, 11)
                                    else {"start_new_session": True})
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=theirs if writes_stdin else subprocess.DEVNULL,
                stdout=subprocess.DEVNULL if writes_stdin else theirs,
                close_fds=True, **group)  # type: ignore[call-overload]
        except OSError as err:
            os.close(ours)
            raise os_error(f"Unable to run command '{self.display}'", err) from err
        finally:
            os.close(theirs)
        self.fd = ours

    def terminate(self) -> None:
        """SIGTERM to the command's process group (no wait)."""
        self._signal(signal.SIGTERM)

    def _signal(self, sig: int, *, leader_gone_too: bool = False) -> None:
        # Once the leader was reaped its pid may only be reused after the whole group is gone,
        # so signalling the group is safe while it has members.
        if self.proc.returncode is not None and not leader_gone_too:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self) -> None:
        """Terminate, give it a moment, then kill what is left of the group; reaps the leader."""
        self.terminate()
        try:
            self.proc.wait(KILL_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        self._signal(signal.SIGKILL, leader_gone_too=True)
        self.proc.wait()

    def wait_status_error(self) -> TransportError | None:
        """Wait for the command; an error if it did not exit with status 0."""
        code = self.proc.wait()
        if code == 0:
            return None
        if code < 0:
            try:
                name = f" ({signal.Signals(-code).name})"
            except ValueError:
                name = ""
            return TransportError(f"Command '{self.display}' was killed by signal {-code}{name}")
        return TransportError(f"Command '{self.display}' exited with status {code}")


class _CommandChannel:
    """What both ends of an exec channel share: the command process."""

    kind = "command"
    _command: _Command

    @property
    def pid(self) -> int:
        pid: int = self._command.proc.pid
        return pid

    @property
    def exit_status(self) -> int | None:
        """The command's return code once it was reaped (negative: killed by that signal)."""
        status: int | None = self._command.proc.returncode
        return status

    def _on_shutdown(self) -> None:
        self._command.terminate()


class CommandOutgoing(_CommandChannel, FdOutgoing):
    """The source end: the stream goes to the command's standard input."""

    def __init__(self, command: _Command) -> None:
        self._command = command
        super().__init__(command.fd, description=f"exec:{command.display}")

    def _release(self) -> None:
        os.close(self._fd)                   # EOF for the command
        if self.cancelled or self.error is not None:
            # The stream already failed: a command still running is of no use any more.
            self._command.stop()
            return
        status = self._command.wait_status_error()
        if status is not None:
            raise fresh(self._fail(status))


class CommandIncoming(_CommandChannel, FdIncoming):
    """The destination end: the stream comes from the command's standard output."""

    def __init__(self, command: _Command) -> None:
        self._command = command
        super().__init__(command.fd, description=f"exec:{command.display}")

    def _release(self) -> None:
        os.close(self._fd)
        if self.cancelled or not self.at_eof:
            # pyvm stopped reading early (load error, cancel): the rest is not wanted.
            self._command.stop()
            return
        status = self._command.wait_status_error()
        if status is not None:
            raise status


def exec_outgoing(argv: Sequence[str]) -> CommandOutgoing:
    """Run ``argv`` and return a channel writing to its standard input."""
    return CommandOutgoing(_Command(argv, writes_stdin=True))


def exec_incoming(argv: Sequence[str]) -> CommandIncoming:
    """Run ``argv`` and return a channel reading its standard output."""
    return CommandIncoming(_Command(argv, writes_stdin=False))
