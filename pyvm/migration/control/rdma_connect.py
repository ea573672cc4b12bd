"""The ``rdma:`` transport in ``migrate`` and ``-incoming``.

The RDMA endpoints (``transports/rdma_transport.py``, on libfabric) carry the ordinary
stream as control messages and move guest RAM with one-sided RDMA writes into the
destination's registered blocks.  Both ends list the same RAM blocks in the same order
(they run with the same arguments), so a block's index names it on the wire.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from pyvm.migration.transports import AbortSignal


def _provider() -> str | None:
    return os.environ.get("PYVM_RDMA_PROVIDER") or None


def _block_specs(blocks_fn: Callable[[], Any] | None) -> list[tuple[str, Any, int]]:
    blocks = list(blocks_fn() if blocks_fn is not None else [])
    return [(b.name, b.mem, b.size) for b in blocks]


def rdma_outgoing_opener(addr: Any, blocks_fn: Callable[[], Any] | None,
                         abort: AbortSignal | None = None,
                         pin_all: bool = False) -> Callable[[], Any]:
    def open_channel() -> Any:
        from pyvm.migration.transports.rdma_transport import RdmaOutgoing
        return RdmaOutgoing(addr.inet.host, addr.inet.port, _block_specs(blocks_fn), pin_all,
                            provider=_provider(), abort=abort)
    return open_channel


def prepare_rdma_incoming(addr: Any, blocks_fn: Callable[[], Any] | None) -> Any:
    from pyvm.migration.control.connect import PreparedIncoming
    from pyvm.migration.transports.rdma_transport import RdmaListener

    listener = RdmaListener(addr.inet.host, addr.inet.port, provider=_provider())

    def accept() -> Any:
        blocks = list(blocks_fn() if blocks_fn is not None else [])
        # Pages never populated read as zero: a zero fill need not touch them.
        return listener.accept([(b.name, b.mem, b.size) for b in blocks],
                               zero_hints=[b.unpopulated for b in blocks])
    return PreparedIncoming(accept, listener.close, None)
