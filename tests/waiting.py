"""Waiting in tests: on a condition with a deadline, never for a fixed time.

``wait_until`` polls a predicate until it holds (and returns its value) or the deadline
passes (AssertionError naming what was awaited).  ``wait_blocked`` waits until a thread is
asleep inside a system call other than ``futex`` (so: blocked in the read, write, accept,
connect or poll under test, not merely waiting for the GIL); it reads the thread's
``/proc/self/task/<tid>/syscall`` (Linux ``Documentation/filesystems/proc.rst``).
``read_until`` reads a child's output pipe until what arrived satisfies a predicate.
"""

from __future__ import annotations

import os
import select
import threading
import time
from typing import IO, Callable, TypeVar

T = TypeVar("T")

# x86-64 system call number of futex (arch/x86/entry/syscalls/syscall_64.tbl): a Python
# thread waiting for the GIL or a lock sleeps there, which is not the block under test.
_SYS_FUTEX = 202


def wait_until(cond: Callable[[], T], timeout: float = 10.0, what: str = "condition",
               interval: float = 0.01) -> T:
    """``cond()``'s first truthy value, polled every ``interval`` s for up to ``timeout`` s."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout} s")
        pause.wait(interval)


def wait_stalled(value: Callable[[], T], timeout: float = 10.0, what: str = "progress",
                 interval: float = 0.1) -> T:
    """Wait until ``value()`` stops changing: the same in two looks ``interval`` s apart
    (a migration whose writes are blocked, say); returns that value."""
    last: list[T] = [value()]

    def same() -> bool:
        now = value()
        unchanged = now == last[0]
        last[0] = now
        return unchanged
    wait_until(same, timeout, what, interval)
    return last[0]


def _syscall_of(tid: int) -> int | None:
    """The number of the system call thread ``tid`` sleeps in; None when it runs."""
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/self/task/{tid}/syscall") as f:
            first = f.read().split()[0]
    except (OSError, IndexError):
        return None
    if state not in ("S", "D") or first in ("running", "-1"):
        return None
    return int(first)


def blocked_in_syscall(thread: threading.Thread) -> bool:
    """Whether ``thread`` sleeps in a system call other than futex."""
    tid = thread.native_id
    if tid is None or not thread.is_alive():
        return False
    nr = _syscall_of(tid)
    return nr is not None and nr != _SYS_FUTEX


def wait_blocked(thread: threading.Thread, timeout: float = 10.0) -> None:
    """Wait until ``thread`` is blocked in a system call (two looks in a row, so that a
    thread merely passing through one does not count)."""
    def twice() -> bool:
        return blocked_in_syscall(thread) and blocked_in_syscall(thread)
    wait_until(twice, timeout, f"thread {thread.name} blocked in a system call")
    assert thread.is_alive()


def read_until(stream: IO[bytes], cond: Callable[[bytes], bool], timeout: float = 20.0,
               got: bytes = b"") -> bytes:
    """Read ``stream`` (a pipe) as output arrives until ``cond(everything read)`` holds;
    returns everything read.  End of file or the deadline first: AssertionError."""
    fd = stream.fileno()
    deadline = time.monotonic() + timeout
    out = bytearray(got)
    while not cond(bytes(out)):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"output not as awaited within {timeout} s: {bytes(out[-300:])!r}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            data = os.read(fd, 65536)
            if not data:
                raise AssertionError(f"end of output before the awaited text: {bytes(out[-300:])!r}")
            out += data
    return bytes(out)
