"""Live migration: QEMU's migration stream format (version 3) and pyvm's precopy.

The stream codec is sans-IO and layered; each module calls only the ones above it in
this list:

=====================  ============================================================
``stream_constants``   markers, flags, commands, capability names, limits
``errors``             :class:`MigrationError` and its subclasses (tree in its docstring)
``stream_writer``      big-endian items into chunks; page payloads stay memoryviews
``stream_reader``      fed bytes, read by generator parse steps; sticky error
``vmdesc_json``        JSON text exactly as QEMU's JSONWriter writes it
``vmstate_codec``      device state from a VMStateDescription, and its vmdesc object
``sections``           section framing, configuration, globalstate, commands
``ram_format``         the ``ram`` section: block list, ZERO/PAGE records, EOS
``decoder``            :class:`StreamDecoder`, the push-style loader, and ``LoadTarget``
``encoder``            :class:`StreamEncoder`, the calls precopy makes
``vmdesc_loader``      sections read by their vmdesc description (the analyzer)
=====================  ============================================================

Transports (``transports/``) only move bytes; the orchestration (``migration``) drives
the encoder and decoder.
"""

from pyvm.migration.stream.decoder import LoadTarget, StreamDecoder
from pyvm.migration.stream.encoder import RAM_SECTION_ID, StreamEncoder
from pyvm.migration.errors import MigrationError
from pyvm.migration.stream.ram_format import StreamBlock

__all__ = ["LoadTarget", "MigrationError", "RAM_SECTION_ID", "StreamBlock", "StreamDecoder",
           "StreamEncoder"]
