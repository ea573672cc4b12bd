"""Live migration: QEMU's migration stream format (version 3) and pyvm's precopy.

Three layers, each a folder; each calls only the ones below it (the import contracts in
``pyproject.toml`` check this)::

    control/      the state machine: commands, precopy, incoming, parameters
       |    \\
       v     v
    stream/   transports/     bytes <-> objects (no I/O)  |  thin byte pipes (no format)
       |
       v
    errors        the error tree of the stream format and the control side

=============================  =================================================================
``errors``                     :class:`MigrationError` and its subclasses (tree in its docstring)
**stream/** (sans-IO)
``stream.constants``           markers, flags, commands, capability names, limits
``stream.writer``              big-endian items into chunks; page payloads stay memoryviews
``stream.reader``              fed bytes, read by generator parse steps; sticky error
``stream.vmdesc_json``         JSON text exactly as QEMU's JSONWriter writes it
``stream.vmstate_codec``       device state from a VMStateDescription, and its vmdesc object
``stream.sections``            section framing, configuration, globalstate, commands
``stream.ram_format``          the ``ram`` section: :class:`StreamBlock`, ZERO/PAGE records, EOS
``stream.ram_loader``          loading the ``ram`` section into guest RAM (bounds-checked)
``stream.decoder``             :class:`StreamDecoder`, the push-style loader, and ``LoadTarget``
``stream.encoder``             :class:`StreamEncoder`, the calls precopy makes
``stream.vmdesc_loader``       sections read by their vmdesc description (the analyzer)
``stream.text``                stream bytes shown in messages, escaped (never raw)
``stream.integrity``           ``x-checksum`` (CRC-32C per section and page batch) and the
                               one-section-per-device check at EOF
**transports/** (byte pipes)   see :mod:`pyvm.migration.transports` for its own table
``transports.base``            the channel interfaces, :class:`AbortSignal`, the fd channel core
``transports.socket_transport``  tcp, unix, fd and the ``-incoming`` listener
``transports.exec_transport``  ``exec:`` commands
``transports.file_transport``  ``file:`` with an offset
``transports.fabric``          libfabric endpoints (the ``_fabric`` extension)
``transports.rdma_protocol``   rdma control messages and chunk maps (sans-IO)
``transports.rdma_transport``  ``rdma:``: stream as messages, RAM by one-sided writes
``transports.tls_relay``       a tcp/unix pipe through a TLS session (Python's ``ssl``)
**control/** (orchestration)
``control.status``             :class:`MigrationStatus`, the statistics, query-migrate's shape
``control.capabilities``       :class:`MigrationCapabilities`: QEMU's capability rules
``control.parameters``         migrate-set-parameters and its checks
``control.blockers``           reasons a VM may not migrate now
``control.address``            ``uri`` / ``channels`` -> a typed migration address
``control.channel``            the typed :class:`Channel` precopy writes to (stream or rdma)
``control.connect``            an address -> an open channel (outgoing) or a listener (incoming)
``control.manager``            one VM's migration state; owns and joins the migration threads
``control.precopy``            the source: setup, iterate, switchover, on its own thread
``control.incoming``           the destination: the load thread and its run-state decisions
``control.service``            the commands' behaviour (QEMU's checks and texts)
``control.qmp_schema``         the commands' QMP argument and result types
``control.tls_setup``          ``tls-creds``/``tls-hostname``/``tls-authz`` applied to channels
``control.pagemap_query``      ``x-query-ram-pagemap``: each page's state during a migration
``control.monitor_commands``   the commands on a monitor's QMP and HMP tables (installed
                               explicitly by whoever builds the monitor)
``policy``                     the migration-algorithm API of the lab (:mod:`pyvm.lab`)
=============================  =================================================================
"""

from pyvm.migration.errors import MigrationError
from pyvm.migration.stream.decoder import LoadTarget, StreamDecoder
from pyvm.migration.stream.encoder import RAM_SECTION_ID, StreamEncoder
from pyvm.migration.stream.ram_format import StreamBlock

__all__ = ["LoadTarget", "MigrationError", "RAM_SECTION_ID", "StreamBlock", "StreamDecoder",
           "StreamEncoder"]
