"""The destination side: wait for a stream, load it into the VM, start the guest.

``-incoming URI`` starts listening (or opening the file / command) at start-up;
``-incoming defer`` waits for ``migrate-incoming``.  The VM stays in ``inmigrate`` while
the stream loads on a thread of its own: RAM pages go straight into guest RAM through the
decoder's bounds-checked writes, device and vCPU sections into their objects.  After the
end of the stream the guest takes the run state the source had (``globalstate``):
``running`` runs it (unless this VM was started with ``-S``), anything else leaves it
stopped.  A bad or cut stream prints QEMU's load errors and ends the process with status 1,
unless ``exit-on-error`` was false, in which case the VM stays up in ``failed``.  Any
other failure of the load thread ends the same way (``failed`` with ``error-desc``,
``exit-on-error`` honoured): the status never stays ``active``.

The load thread belongs to its :class:`IncomingMigration`; the migration manager stops and
joins it when the VM closes.
"""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING, Any, Callable, Collection

import numpy as np

from pyvm.errors import PyvmError
from pyvm.migration.control.manager import MigrationManager
from pyvm.migration.control.postcopy_incoming import PostcopyDestination
from pyvm.migration.control.multifd_incoming import MultifdIncoming
from pyvm.migration.control.mapped_ram_restore import ParallelPageReader
from pyvm.migration.control.status import DestinationSnapshot, MigrationStatus, build_migration_info
from pyvm.migration.errors import MigrationError
from pyvm.migration.stream import ram_format
from pyvm.migration.stream.decoder import StreamDecoder
from pyvm.migration.transports import IncomingChannel
from pyvm.migration.transports.file_transport import FileIncoming
from pyvm.runstate import RunState

if TYPE_CHECKING:
    from pyvm.machine import Machine

READ_SIZE = 1 << 20
JOIN_QUICK = 5.0             # seconds: a paused load thread is ending already


class MachineLoadTarget:
    """The decoder's view of the destination VM (pyvm.migration.stream.decoder.LoadTarget)."""

    def __init__(self, machine: "Machine", manager: MigrationManager) -> None:
        self.machine = machine
        self.manager = manager
        self.loaded_runstate: str | None = None
        self._objects = {(o.idstr, o.instance_id): o for o in machine.migratable()}

    def machine_type(self) -> str | None:
        return self.machine.machine_type

    def capabilities(self) -> Collection[str] | None:
        return self.manager.stream_capabilities()

    def ram_block(self, name: str, length: int) -> ram_format.StreamBlock | None:
        block = self.machine.ram.by_name(name)
        if block is None:
            return None
        ignored = self.manager.block_ignored(block)
        # Pages this process never populated are zero: ZERO records for them need not read
        # them.  Taken now, when the RAM section starts; from here on only the loader
        # writes guest RAM (the vCPUs do not run while the VM is in 'inmigrate').
        # With multifd, page channels write pages the loader does not see: no known-zero map.
        unpopulated = None if ignored or self.manager.caps["multifd"] else block.unpopulated()
        written = None if unpopulated is None else (~unpopulated).view(np.uint8)
        return ram_format.StreamBlock(block.name, block.size, block.gpa,
                                   None if ignored else block.mem, ignored, written=written)

    def device(self, idstr: str, instance_id: int) -> Any:
        return self._objects.get((idstr, instance_id))

    def set_runstate(self, runstate: str) -> None:
        self.loaded_runstate = runstate

    def expected_sections(self) -> list[tuple[str, int]]:
        """Every section this VM must receive exactly once (pyvm.migration.stream.integrity)."""
        return [("ram", 0), ("globalstate", 0),
                *((o.idstr, o.instance_id) for o in self.machine.migratable()
                  if getattr(o, "vmsd", None) is not None)]


class IncomingMigration:
    """One incoming migration: a transport opener plus the load thread."""

    def __init__(self, manager: MigrationManager, machine: "Machine",
                 open_channel: Callable[[], IncomingChannel], exit_on_error: bool = True,
                 socket_address: list[dict[str, Any]] | None = None,
                 on_close: Callable[[], None] | None = None,
                 multifd: MultifdIncoming | None = None) -> None:
        self.mgr = manager
        #: the page channels beside the main one (multifd capability), owned here
        self.multifd = multifd
        self.machine = machine
        self.open_channel = open_channel
        self.exit_on_error = exit_on_error
        self.socket_address = socket_address
        self.on_close = on_close
        self.status: MigrationStatus | None = None
        self.error_desc: str | None = None
        self.channel: IncomingChannel | None = None
        self._stopping = threading.Event()
        self.postcopy: PostcopyDestination | None = None
        self._target: MachineLoadTarget | None = None
        self._decoder: StreamDecoder | None = None
        self._close_lock = threading.Lock()
        #: mapped-ram with multifd: the threads that read the pages (joined per block)
        self.page_reader: ParallelPageReader | None = None
        self.thread = threading.Thread(target=self._run, name="migration-incoming", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Any thread: stop waiting for the peer or loading (the VM is closing)."""
        self._stopping.set()
        if self.page_reader is not None:
            self.page_reader.stop()
        if self.postcopy is not None:
            self.postcopy.close()      # wakes a vCPU waiting for a page that will not come
        if self.multifd is not None:
            self.multifd.stop()
        channel = self.channel
        if channel is not None:
            try:
                channel.shutdown()
            except Exception:  # noqa: BLE001 - best effort: the thread ends either way
                pass
        self._close_listener()

    def join(self, timeout: float | None = None) -> None:
        if self.thread.is_alive() or self.thread.ident is not None:
            self.thread.join(timeout)
        if self.multifd is not None:
            self.multifd.join(timeout)

    def _close_listener(self) -> None:
        with self._close_lock:
            on_close, self.on_close = self.on_close, None
        if on_close is not None:
            on_close()

    def query(self) -> dict[str, Any]:
        blocktime = self.postcopy.blocktime if self.postcopy is not None else None
        info = build_migration_info(None, DestinationSnapshot(
            self.status or MigrationStatus.NONE, list(self.socket_address or []),
            postcopy_blocktime=None if blocktime is None else blocktime.total_ms,
            postcopy_vcpu_blocktime=None if blocktime is None else blocktime.vcpu_ms))
        if self.error_desc is not None and self.status is MigrationStatus.FAILED:
            info["error-desc"] = self.error_desc
        return info

    def _set_status(self, status: MigrationStatus) -> None:
        self.status = status
        self.mgr.set_status(status)

    def _run(self, resume_from: StreamDecoder | None = None) -> None:
        multifd = self.multifd
        if resume_from is None or self.postcopy is None or self._target is None:
            target = self._target = MachineLoadTarget(self.machine, self.mgr)
            decoder = StreamDecoder(target, expected_sections=target.expected_sections(),
                                    on_multifd_flush=None if multifd is None else multifd.flush)
            postcopy = self.postcopy = PostcopyDestination(
                self.mgr, self.machine, decoder, lambda: self.channel, self._set_status,
                lambda: self._start_guest(target), accept_more=lambda: self.open_channel())
            decoder.on_command = postcopy.handle
        else:       # postcopy recovery (never with multifd: QEMU refuses the pair)
            target, postcopy = self._target, self.postcopy
            decoder = postcopy.decoder = StreamDecoder(target, resume_from=resume_from)
        self._decoder = decoder
        try:
            channel = self.channel = self.open_channel()
            if self._stopping.is_set():
                return
            self._parallel_pages(channel, decoder)
            if resume_from is None:
                self._set_status(MigrationStatus.ACTIVE)
            else:
                self._set_status(MigrationStatus.POSTCOPY_RECOVER)
                postcopy.reconnect()
            while not decoder.finished:
                n, _ = decoder.feed_from(channel.readinto, READ_SIZE)
                if n == 0:
                    decoder.close()
                    break
            if postcopy.fault_error is not None:
                raise postcopy.fault_error
            self._finish(target)
        except MigrationError as err:
            self._fail(err.report(), str(err))
        except (PyvmError, OSError) as err:
            failed = None if multifd is None else multifd.failure
            if failed is not None:       # a page channel failed and stopped the main one
                self._fail(failed.report(), str(failed))
                return
            text = str(err)
            self._fail([text, "load of migration failed: Input/output error"], text)
        except Exception as err:  # noqa: BLE001 - any failure must end in 'failed'
            text = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            self._fail([f"internal error while loading the migration stream: {text}",
                        "load of migration failed: Input/output error"], text)
        finally:
            if self.status is not MigrationStatus.POSTCOPY_PAUSED:
                decoder.release()
                postcopy.close()
            # else: a paused postcopy keeps its registration (vCPUs wait for their pages)
            # and its decoder, which a recovery carries on
            if multifd is not None:
                multifd.stop()
                multifd.join()
            if self.channel is not None:
                try:
                    self.channel.close()
                except Exception:  # noqa: BLE001 - the load result stands
                    pass
            self._close_listener()
            if self.status is not MigrationStatus.POSTCOPY_PAUSED:
                postcopy.join_preempt()

    def _parallel_pages(self, channel: IncomingChannel, decoder: StreamDecoder) -> None:
        """mapped-ram: the pages regions are read by positioned reads straight into guest
        RAM, by multifd-channels threads with multifd, else by one (QEMU 9
        migration/ram.c read_ramblock_mapped_ram, migration/file.c)."""
        caps = self.mgr.caps
        if caps["mapped-ram"] and isinstance(channel, FileIncoming):
            params = self.mgr.params
            multifd = bool(caps["multifd"])
            self.page_reader = ParallelPageReader(
                channel.filename, int(params["multifd-channels"]) if multifd else 1,
                direct_io=multifd and bool(params["direct-io"]), main_fd=channel.fileno(),
                multifd=multifd)
            decoder.mapped_page_reader = self.page_reader

    def recover(self, open_channel: Callable[[], IncomingChannel],
                socket_address: list[dict[str, Any]] | None,
                on_close: Callable[[], None] | None) -> None:
        """``migrate-recover``: listen again and carry on a paused postcopy stream."""
        decoder = self._decoder
        assert decoder is not None and self.status is MigrationStatus.POSTCOPY_PAUSED
        self.thread.join(JOIN_QUICK)
        self.open_channel = open_channel
        self.socket_address = socket_address
        with self._close_lock:
            self.on_close = on_close
        self.channel = None
        self.thread = threading.Thread(target=self._run, args=(decoder,),
                                       name="migration-incoming", daemon=True)
        self.thread.start()

    def pause(self) -> None:
        """``migrate-pause`` on the destination: cut the channel (postcopy pauses)."""
        channel = self.channel
        if channel is not None:
            channel.shutdown()

    def _finish(self, target: MachineLoadTarget) -> None:
        if self.postcopy is not None and self.postcopy.running:
            self.postcopy.finish()       # the guest runs already
            self.status = MigrationStatus.COMPLETED
            return
        self._start_guest(target)
        self._set_status(MigrationStatus.COMPLETED)

    def _start_guest(self, target: MachineLoadTarget) -> None:
        m = self.machine
        source_state = target.loaded_runstate or "running"

        def start_guest() -> None:
            if source_state == "running":
                m.runstate.set(RunState.RUNNING if m.autostart else RunState.PAUSED)
            else:
                try:
                    m.runstate.set(RunState(source_state))
                except ValueError:
                    m.runstate.set(RunState.PAUSED)
        m.run_on_loop(start_guest)

    def _fail(self, lines: list[str], desc: str) -> None:
        if self._stopping.is_set():
            return                 # the VM is closing: nobody is left to tell
        for line in lines:
            print(f"pyvm: {line}", file=sys.stderr, flush=True)
        self.error_desc = desc
        if self.postcopy is not None and self.postcopy.running:
            # The guest runs here with part of its RAM still on the source: neither side
            # may go on alone (migration/savevm.c postcopy_pause_incoming).
            self.postcopy.disconnect()
            self._set_status(MigrationStatus.POSTCOPY_PAUSED)
            return
        self._set_status(MigrationStatus.FAILED)
        if self.exit_on_error:
            self.machine.request_exit(1)
