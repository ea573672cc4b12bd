"""The destination side: a push-style loader for a whole migration stream (sans-IO).

Feed it bytes as they arrive; it parses as far as they allow and applies what it reads to
a :class:`LoadTarget` the caller provides (the machine, or the analyzer's recorder).  It
follows QEMU's ``qemu_loadvm_state`` (migration/savevm.c) step by step:

1. header: magic, version 3, the configuration section, checked against the target;
2. sections until ``QEMU_VM_EOF``: START/FULL open a section by (idstr, instance_id),
   PART/END continue one by section id; every section must end with its footer;
   ``QEMU_VM_COMMAND`` is parsed and refused (pyvm's precopy needs none);
3. after EOF the ``0x06`` vmdesc trailer, whose JSON is skipped (or kept for analyzers).

The ``ram`` section is loaded into the target's block buffers, ``globalstate`` sets the
target's run state, every other section is a device whose vmsd is decoded.  Any
violation raises a :class:`MigrationError` carrying QEMU's texts; the decoder then refuses
further input.  It never writes outside the block buffers the target handed out.

Usage::

    dec = StreamDecoder(target)  # expected_sections=[(idstr, instance), ...] to check completeness
    for chunk in transport:
        dec.feed(chunk)          # -> list of events, or raises MigrationError
    dec.close()                  # end of input: raises if the stream was cut short
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Any, Callable, Collection, Generator, Optional, Protocol, Union

from pyvm.migration.errors import (DecoderStoppedError, MigrationError, StreamFormatError,
                                   StreamMismatchError)
from pyvm.migration.stream.integrity import (CHECKSUM_CAPABILITY, SectionTally, check_section_checksum,
                                     crc32c_extend)
from pyvm.migration.stream.ram_format import StreamBlock
from pyvm.migration.stream.ram_loader import MappedPageReader, RamLoader
from pyvm.migration.stream.sections import (GLOBALSTATE_IDSTR, GlobalState, Configuration,
                                     check_configuration, read_command, read_configuration,
                                     read_section_footer)
from pyvm.migration.stream.constants import (MAX_VMDESC_LEN, QEMU_VM_COMMAND,
                                             QEMU_VM_CONFIGURATION, QEMU_VM_EOF,
                                             QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION,
                                             QEMU_VM_FILE_VERSION_COMPAT, QEMU_VM_SECTION_END,
                                             QEMU_VM_SECTION_FULL, QEMU_VM_SECTION_PART,
                                             QEMU_VM_SECTION_START, QEMU_VM_VMDESCRIPTION,
                                             RAM_SECTION_IDSTR, RAM_SECTION_VERSION)
from pyvm.migration.stream.reader import StreamReader
from pyvm.migration.stream.text import shown_name
from pyvm.migration.stream.vmstate_codec import apply_loaded, load_vmstate


class SectionLoader(Protocol):
    """A section the target loads itself (the analyzer's vmdesc-driven reader)."""

    version_id: int | None    # local version; None accepts any

    def load_section(self, reader: StreamReader, version_id: int) -> Generator[None, None, None]: ...


class LoadTarget(Protocol):
    """What the decoder needs from the VM it loads into."""

    def machine_type(self) -> str | None:
        """The local machine type name; None accepts any (analyzers)."""

    def capabilities(self) -> Collection[str] | None:
        """Migration capabilities enabled locally; None adopts the stream's (analyzers)."""

    def ram_block(self, name: str, length: int) -> StreamBlock | None:
        """The local RAM block ``name`` (with a writable ``buffer``), or None if unknown.

        ``length`` is the length the stream announces (0 when a page record names a block
        the setup did not list); a VM returns its own block and the decoder compares.
        """

    def device(self, idstr: str, instance_id: int) -> Any:
        """The object behind section (idstr, instance_id), or None if there is none.

        The decoder itself loads ``ram`` and, when the target returns None for it,
        ``globalstate`` (calling :meth:`set_runstate`).  Otherwise the object is either an object with ``vmsd`` (a VMStateDescription) whose attributes receive
        the fields and whose ``post_load()`` (if any) is called after them, or a
        :class:`SectionLoader`.
        """

    def set_runstate(self, runstate: str) -> None:
        """The run state the source was in (``globalstate`` section), e.g. "running"."""


# -- events ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class StreamHeader:
    """Magic, version and configuration section were read and accepted."""

    configuration: Configuration | None


@dataclass(frozen=True)
class SectionLoaded:
    """A section (START/PART/END/FULL) was loaded and its footer checked."""

    section_type: int
    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    end_offset: int = 0        # stream offset just after the section (and its checksum)


@dataclass(frozen=True)
class RunStateLoaded:
    runstate: str


@dataclass(frozen=True)
class EndOfState:
    """``QEMU_VM_EOF``: all RAM and device state is loaded."""


@dataclass(frozen=True)
class VmDescription:
    """The vmdesc trailer: its length, and its JSON if the decoder keeps it."""

    length: int
    json: bytes | None


@dataclass(frozen=True)
class StreamFinished:
    """Nothing more will be read; ``warnings`` are QEMU's non-fatal messages."""

    warnings: tuple[str, ...]


Event = Union[StreamHeader, SectionLoaded, RunStateLoaded, EndOfState, VmDescription, StreamFinished]


# -- section handlers ------------------------------------------------------------------------

class _Handler:
    idstr: str
    version_id: Optional[int]

    def load(self, r: StreamReader, version_id: int) -> Generator[None, None, None]:
        raise NotImplementedError


class _RamHandler(_Handler):
    def __init__(self, loader: RamLoader) -> None:
        self.idstr = RAM_SECTION_IDSTR
        self.version_id = RAM_SECTION_VERSION
        self.loader = loader

    def load(self, r: StreamReader, version_id: int) -> Generator[None, None, None]:
        yield from self.loader.load(r, version_id)


class _DeviceHandler(_Handler):
    def __init__(self, idstr: str, obj: Any) -> None:
        self.idstr = idstr
        self.obj = obj
        self.version_id = obj.vmsd.version_id

    def load(self, r: StreamReader, version_id: int) -> Generator[None, None, None]:
        values: dict[str, Any] = {}
        yield from load_vmstate(r, self.obj.vmsd, version_id, values)
        try:
            apply_loaded(self.obj, values)
        except MigrationError:
            raise
        except Exception as err:  # a device refusing its state, like a failing post_load
            # QEMU's post_load hooks error_report() their reason before the section line.
            raise StreamMismatchError(f"{self.idstr}: post_load failed: {err}") from err


class _LoaderHandler(_Handler):
    def __init__(self, idstr: str, loader: SectionLoader) -> None:
        self.idstr = idstr
        self.loader = loader
        self.version_id = loader.version_id

    def load(self, r: StreamReader, version_id: int) -> Generator[None, None, None]:
        yield from self.loader.load_section(r, version_id)


class _GlobalStateHandler(_Handler):
    def __init__(self, decoder: "StreamDecoder") -> None:
        self.idstr = GLOBALSTATE_IDSTR
        self.version_id = GlobalState.vmsd.version_id
        self.decoder = decoder

    def load(self, r: StreamReader, version_id: int) -> Generator[None, None, None]:
        state = GlobalState()
        values: dict[str, Any] = {}
        yield from load_vmstate(r, GlobalState.vmsd, version_id, values)
        apply_loaded(state, values)
        name = state.runstate_name()
        self.decoder.runstate = name
        self.decoder.target.set_runstate(name)
        self.decoder._events.append(RunStateLoaded(name))


# -- the decoder -----------------------------------------------------------------------------

class StreamDecoder:
    """Push-style loader of one migration stream into ``target``.

    ``expect_configuration`` mirrors QEMU's send-configuration property (on by default);
    ``keep_vmdesc`` keeps the vmdesc JSON (up to 16 MiB) in the :class:`VmDescription`
    event instead of skipping it.  ``on_multifd_flush`` is called at each
    ``RAM_SAVE_FLAG_MULTIFD_FLUSH`` record (multifd: wait for every page channel).
    """

    def __init__(self, target: LoadTarget, *, expect_configuration: bool = True,
                 keep_vmdesc: bool = False,
                 expected_sections: Collection[tuple[str, int]] | None = None,
                 resume_from: "StreamDecoder | None" = None,
                 on_multifd_flush: Callable[[], None] | None = None) -> None:
        self.target = target
        self.on_multifd_flush = on_multifd_flush
        # None: load whatever sections come (analyzers); else each exactly once (integrity.py)
        self.tally = None if expected_sections is None else SectionTally(expected_sections)
        self.expect_configuration = expect_configuration
        self.keep_vmdesc = keep_vmdesc
        self.configuration: Configuration | None = None
        self.runstate: str | None = None
        self.ram: RamLoader | None = None
        self.checksum = False            # x-checksum: a CRC-32C follows every section footer
        self._chain = 0                  # the last section's checksum (chained CRC)
        self.warnings: list[str] = []
        self.state_complete = False      # QEMU_VM_EOF was read
        self.finished = False            # nothing more will be read
        self.trailing_bytes = 0          # input after the end, ignored
        self._reader = StreamReader()
        self._sections: dict[int, tuple[_Handler, int]] = {}   # id -> handler, load version
        self._events: list[Event] = []
        #: postcopy (pyvm.migration.control.postcopy_incoming): QEMU_VM_COMMAND records go
        #: to this handler as (cmd, payload) instead of being refused; PACKAGED's nested
        #: stream is then read inline, as the records that follow.
        self.on_command: Callable[[int, bytes], None] | None = None
        #: set once postcopy listens: a postcopy stream ends at QEMU_VM_EOF (no vmdesc)
        self.stop_at_eof = False
        #: mapped-ram with multifd: who reads the pages regions (RamLoader.page_reader)
        self.mapped_page_reader: MappedPageReader | None = None
        if resume_from is None:
            self._steps = self._load_stream()
        else:
            # Postcopy recovery: a new connection carries on the stream at a section
            # boundary, with no header (migration/savevm.c postcopy_pause_incoming).
            self.configuration = resume_from.configuration
            self.tally = resume_from.tally
            self.ram = resume_from.ram
            if self.ram is not None:
                self.ram.reopen()          # the failed decoder let go of the RAM views
            self.checksum = resume_from.checksum
            self.runstate = resume_from.runstate
            self._sections = resume_from._sections
            self.on_command = resume_from.on_command
            self.stop_at_eof = resume_from.stop_at_eof
            self._steps = self._resume_stream()

    # -- input -----------------------------------------------------------------------------
    @property
    def error(self) -> MigrationError | None:
        return self._reader.error

    @property
    def offset(self) -> int:
        """Bytes of the stream consumed so far."""
        return self._reader.offset

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Parse as much as ``data`` allows; raises MigrationError on a bad stream."""
        if self.finished:
            self.trailing_bytes += len(data)
            return []
        self._reader.feed(data)
        return self._advance()

    def feed_from(self, readinto: Callable[[memoryview], int], size: int) -> tuple[int, list[Event]]:
        """Like :meth:`feed`, but the input is read by ``readinto`` straight into the
        decoder's buffer (up to ``size`` bytes, no copy).  Returns (bytes read, events);
        0 bytes means the transport reached its end: call :meth:`close`."""
        if self.finished:
            scratch = bytearray(size)
            n = readinto(memoryview(scratch))
            self.trailing_bytes += n
            return n, []
        n = self._reader.fill(readinto, size)
        return n, (self._advance() if n else [])

    def close(self) -> list[Event]:
        """End of input: raises TruncatedStreamError if the stream stopped short."""
        if self.finished:
            return []
        if self.error is not None:
            raise DecoderStoppedError(f"migration stream decoder stopped after an error: {self.error}",
                                      errno=self.error.errno) from self.error
        self._reader.close()
        return self._advance()

    def release(self) -> None:
        """Let go of the target's RAM buffers (done automatically at the end or on error)."""
        if self.ram is not None:
            self.ram.release()

    def _advance(self) -> list[Event]:
        self._events = []
        try:
            next(self._steps)
        except StopIteration:
            self.finished = True
            self.release()
        except MigrationError as err:
            self._reader.fail(err)
            self.release()
            raise
        except Exception as err:
            self._reader.fail(MigrationError(detail=f"internal error while loading: {err!r}"))
            self.release()
            raise
        events, self._events = self._events, []
        return events

    # -- the stream, step by step -------------------------------------------------------------
    def _load_stream(self) -> Generator[None, None, None]:
        r = self._reader
        yield from self._load_header(r)
        caps = self.target.capabilities()
        if caps is None:
            caps = self.configuration.capabilities if self.configuration else ()
        self.ram = RamLoader(self.target.ram_block, "x-ignore-shared" in caps,
                             on_multifd_flush=self.on_multifd_flush,
                             mapped_ram="mapped-ram" in caps)
        self.ram.page_reader = self.mapped_page_reader
        self.checksum = CHECKSUM_CAPABILITY in caps
        yield from self._load_sections(r, _RamHandler(self.ram))

    def _resume_stream(self) -> Generator[None, None, None]:
        assert self.ram is not None, "a stream is resumed after its RAM section started"
        yield from self._load_sections(self._reader, _RamHandler(self.ram))

    def _load_sections(self, r: StreamReader, ram_handler: "_RamHandler") -> Generator[None, None, None]:
        while True:
            if self.checksum:     # chained over all sections so far (integrity.py)
                r.begin_digest(crc32c_extend, self._chain)
            section_type = yield from r.read_u8("a section type")
            if section_type in (QEMU_VM_SECTION_START, QEMU_VM_SECTION_FULL):
                yield from self._load_start_full(r, section_type, ram_handler)
            elif section_type in (QEMU_VM_SECTION_PART, QEMU_VM_SECTION_END):
                yield from self._load_part_end(r, section_type)
            elif section_type == QEMU_VM_COMMAND:
                if self.on_command is None:
                    yield from read_command(r)
                else:
                    cmd = yield from r.read_be16("QEMU_VM_COMMAND")
                    length = yield from r.read_be16("QEMU_VM_COMMAND")
                    payload = yield from r.read_bytes(length, "a command's payload")
                    self.on_command(cmd, payload)
            elif section_type == QEMU_VM_EOF:
                if self.tally is not None:
                    self.tally.check_complete()
                break
            else:
                raise StreamFormatError(f"Unknown savevm section type {section_type}")
        self.state_complete = True
        self._events.append(EndOfState())
        if not self.stop_at_eof:
            yield from self._load_trailer(r)
        self._events.append(StreamFinished(tuple(self.warnings)))

    def _load_header(self, r: StreamReader) -> Generator[None, None, None]:
        magic = yield from r.read_be32("the stream magic")
        if magic != QEMU_VM_FILE_MAGIC:
            raise StreamFormatError("Not a migration stream",
                                    detail=f"magic 0x{magic:08x} != 0x{QEMU_VM_FILE_MAGIC:08x}")
        version = yield from r.read_be32("the stream version")
        if version == QEMU_VM_FILE_VERSION_COMPAT:
            raise StreamFormatError("SaveVM v2 format is obsolete and don't work anymore",
                                    errno=errno.ENOTSUP)
        if version != QEMU_VM_FILE_VERSION:
            raise StreamFormatError("Unsupported migration stream version", errno=errno.ENOTSUP,
                                    detail=f"file version {version:x} != {QEMU_VM_FILE_VERSION:x}")
        if self.expect_configuration:
            marker = yield from r.read_u8("the configuration section")
            if marker != QEMU_VM_CONFIGURATION:
                raise StreamFormatError("Configuration section missing")
            config = yield from read_configuration(r)
            check_configuration(config, self.target.machine_type(), self.target.capabilities())
            self.configuration = config
        self._events.append(StreamHeader(self.configuration))

    def _load_start_full(self, r: StreamReader, section_type: int,
                         ram_handler: _RamHandler) -> Generator[None, None, None]:
        section_id = yield from r.read_be32("a section header")
        raw = yield from r.read_counted("a section header")
        if not raw:
            raise StreamFormatError(f"Unable to read ID string for section {section_id}")
        instance_id = yield from r.read_be32("a section header")
        version_id = yield from r.read_be32("a section header")
        idstr = shown_name(raw)
        if self.tally is not None:
            self.tally.opened(idstr, instance_id)
        handler = self._find_handler(idstr, instance_id, ram_handler)
        if handler.version_id is not None and version_id > handler.version_id:
            raise StreamMismatchError(
                f"savevm: unsupported version {version_id} for '{idstr}' v{handler.version_id}")
        self._sections[section_id] = (handler, version_id)
        try:
            yield from handler.load(r, version_id)
        except MigrationError as err:
            err.add_context(f"error while loading state for instance 0x{instance_id:x} of device '{idstr}'")
            raise
        yield from read_section_footer(r, idstr, section_id)
        yield from self._check_checksum(r, idstr, section_id)
        self._events.append(SectionLoaded(section_type, section_id, idstr, instance_id, version_id,
                                          r.offset))

    def _find_handler(self, idstr: str, instance_id: int, ram_handler: _RamHandler) -> _Handler:
        if idstr == RAM_SECTION_IDSTR and instance_id == 0:
            return ram_handler
        obj = self.target.device(idstr, instance_id)
        if obj is None and idstr == GLOBALSTATE_IDSTR and instance_id == 0:
            return _GlobalStateHandler(self)
        if obj is None:
            raise StreamMismatchError(
                f"Unknown savevm section or instance '{idstr}' {instance_id}. Make sure that your "
                "current VM setup matches your saved VM setup, including any hotplugged devices")
        if hasattr(obj, "load_section"):
            return _LoaderHandler(idstr, obj)
        if getattr(obj, "vmsd", None) is None:
            raise StreamMismatchError(detail=f"device '{idstr}' has no migratable state")
        return _DeviceHandler(idstr, obj)

    def _load_part_end(self, r: StreamReader, section_type: int) -> Generator[None, None, None]:
        section_id = yield from r.read_be32("a section header")
        entry = self._sections.get(section_id)
        if entry is None:
            raise StreamFormatError(f"Unknown savevm section {section_id}")
        handler, version_id = entry
        try:
            yield from handler.load(r, version_id)
        except MigrationError as err:
            err.add_context(f"error while loading state section id {section_id}({handler.idstr})")
            raise
        yield from read_section_footer(r, handler.idstr, section_id)
        yield from self._check_checksum(r, handler.idstr, section_id)
        self._events.append(SectionLoaded(section_type, section_id, handler.idstr, 0, version_id,
                                          r.offset))

    def _check_checksum(self, r: StreamReader, idstr: str,
                        section_id: int) -> Generator[None, None, None]:
        """x-checksum: the be32 CRC-32C after the footer covers the section's bytes."""
        if not self.checksum:
            return
        computed = r.end_digest()
        received = yield from r.read_be32(f"the checksum of section '{idstr}'")
        check_section_checksum(idstr, section_id, received, computed)
        self._chain = computed

    def _load_trailer(self, r: StreamReader) -> Generator[None, None, None]:
        """The vmdesc trailer; as in QEMU, nothing after EOF can fail the load."""
        if not (yield from r.wait_or_end(1)):
            self.warnings.append("Expected vmdescription section, but got 0")
            return
        marker = r.u8()
        if marker != QEMU_VM_VMDESCRIPTION:
            self.warnings.append(f"Expected vmdescription section, but got {marker}")
            return
        if not (yield from r.wait_or_end(4)):
            return
        length = r.be32()
        if self.keep_vmdesc and length <= MAX_VMDESC_LEN:
            if not (yield from r.wait_or_end(length)):
                return
            self._events.append(VmDescription(length, r.take(length)))
            return
        if not (yield from r.skip_or_end(length)):
            return
        self._events.append(VmDescription(length, None))
