"""The destination's end of the postcopy preempt channel (``postcopy-preempt``).

QEMU's design (docs/devel/migration/postcopy.rst "Postcopy Preemption Mode",
migration/postcopy-ram.c ``postcopy_preempt_new_channel``/``postcopy_preempt_thread``):
with the capability on, the source opens a second connection to the same address right
after the main one, and sends the pages the destination asked for on it, so that a
requested page never waits behind the background pages queued on the main channel.  The
destination takes the second connection on the same listener, reads it on a thread of
its own and places each page the same way the load thread does (``UFFDIO_COPY`` wakes
the waiting vCPU).  The channel ends with ``RAM_SAVE_FLAG_EOS`` before the main stream's
``QEMU_VM_EOF``, and the load completes only after both ended.

If the connection breaks, postcopy pauses as for the main channel; a recovery
(``migrate-recover`` / ``migrate resume=true``) connects a new preempt channel, and the
pages lost in flight are asked for again.
"""

from __future__ import annotations

import threading
from typing import Callable

from pyvm.errors import PyvmError
from pyvm.migration.errors import MigrationError
from pyvm.migration.stream.preempt_pages import END, PreemptPage, PreemptPageParser
from pyvm.migration.transports.base import IncomingChannel

READ_SIZE = 1 << 16

Place = Callable[[str, int, "bytes | None"], None]


class PreemptReceiver:
    """One preempt connection: accepted, read and placed on its own thread.

    ``accept`` returns the next connection on the migration listener; ``place`` is the
    destination's page placement.  :meth:`stop` (any thread) ends a blocked read;
    :meth:`join` waits for the thread.
    """

    def __init__(self, accept: Callable[[], IncomingChannel], place: Place) -> None:
        self._accept = accept
        self._place = place
        self._lock = threading.Lock()
        self._channel: IncomingChannel | None = None
        self._stopped = False
        self.connected = threading.Event()
        self.ended = threading.Event()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.pages = 0
        self._thread = threading.Thread(target=self._run, name="postcopy-preempt", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            try:
                channel = self._accept()
            except (PyvmError, OSError):
                return                     # the listener closed: the load ended first
            with self._lock:
                if self._stopped:
                    channel.close()
                    return
                self._channel = channel
            self.connected.set()
            self._read(channel)
        except (PyvmError, MigrationError, OSError) as err:
            if not self._stopped:
                self.error = err
        except Exception as err:  # noqa: BLE001 - recorded; the load thread reports it
            self.error = err
        finally:
            self.done.set()

    def _read(self, channel: IncomingChannel) -> None:
        parser = PreemptPageParser()
        buf = bytearray(READ_SIZE)
        view = memoryview(buf)
        while True:
            n = channel.readinto(view)
            if n == 0:
                return
            for record in parser.feed(view[:n]):
                if record is END:
                    self.ended.set()
                    return
                assert isinstance(record, PreemptPage)
                self._place(record.block, record.offset, record.data)
                self.pages += 1

    def wait_end(self, timeout: float) -> bool:
        """True once the channel's EOS was read (or it was never connected)."""
        if not self.connected.is_set():
            return True
        self.done.wait(timeout)
        return self.ended.is_set()

    def stop(self) -> None:
        """End a blocked read (any thread); a receiver still waiting for its connection
        ends when the migration listener closes."""
        with self._lock:
            self._stopped = True
            channel = self._channel
        if channel is not None:
            try:
                channel.shutdown()
            except Exception:  # noqa: BLE001 - best effort: the thread ends either way
                pass

    def join(self, timeout: float | None = None) -> None:
        if self._thread.ident is not None:
            self._thread.join(timeout)
        with self._lock:
            channel, self._channel = self._channel, None
        if channel is not None and not self._thread.is_alive():
            try:
                channel.close()
            except Exception:  # noqa: BLE001 - the load result stands
                pass
