"""Migration transports: thin byte pipes between two pyvm processes, or to a file or command.

A transport opens a byte channel from plain parameters and knows nothing of the stream
format; the control side (:mod:`pyvm.migration.control.channel`) writes the encoder's
chunks into an :class:`OutgoingChannel` or feeds the decoder from an
:class:`IncomingChannel`.

=======================  ======================================================================
``base``                 the two channel interfaces, :class:`AbortSignal`, the error tree
                         (:class:`TransportError`), and the fd-based channel core
``socket_transport``     ``tcp:``, ``unix:``, ``fd:`` and the ``socket`` channels; the
                         :class:`Listener` of ``-incoming``
``exec_transport``       ``exec:CMDLINE`` and the ``exec`` channel's argv
``file_transport``       ``file:PATH[,offset=N]`` and the ``file`` channel
``fabric``               libfabric endpoints over the ``_fabric`` extension (loaded on first use)
``rdma_protocol``        the rdma control messages, capabilities and chunk maps (sans-IO)
``rdma_transport``       ``rdma:HOST:PORT``: the stream as messages, guest RAM placed by
                         one-sided writes (:class:`~.rdma_transport.RdmaOutgoing.place_pages`)
=======================  ======================================================================
"""

from pyvm.migration.transports.base import (AbortSignal, IncomingChannel, OutgoingChannel,
                                            RecordChannel, TransportCancelled, TransportError,
                                            TransportTimeout)
from pyvm.migration.transports.exec_transport import exec_incoming, exec_outgoing, shell_argv
from pyvm.migration.transports.file_transport import file_incoming, file_outgoing
from pyvm.migration.transports.socket_transport import (ListenAddress, Listener, connect_inet,
                                                        connect_unix, from_fd, incoming_from_fd)

__all__ = ["AbortSignal", "IncomingChannel", "ListenAddress", "Listener", "OutgoingChannel",
           "RecordChannel", "TransportCancelled", "TransportError", "TransportTimeout", "connect_inet",
           "connect_unix", "exec_incoming", "exec_outgoing", "file_incoming", "file_outgoing",
           "from_fd", "incoming_from_fd", "shell_argv"]
