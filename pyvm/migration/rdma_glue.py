"""The ``rdma:`` transport's place in ``migrate`` and ``-incoming``.

The libfabric binding and the RDMA protocol live in ``transports/`` and are tested on
their own; the precopy loop does not drive them yet (pages would have to go as RDMA
writes instead of PAGE records, with RAM_SAVE_FLAG_HOOK marking rounds).  Until then an
``rdma:`` address fails with one clear line instead of half working.
"""

from __future__ import annotations

from typing import Any, Callable

from pyvm.migration.transports import TransportError

NOT_WIRED = ("RDMA ERROR: the rdma transport is not available for migrate in this pyvm "
             "version yet (use tcp: or unix:)")


def rdma_outgoing_opener(addr: Any, blocks: Callable[[], Any] | None) -> Callable[[], Any]:
    raise TransportError(NOT_WIRED)


def prepare_rdma_incoming(addr: Any, blocks: Callable[[], Any] | None) -> Any:
    raise TransportError(NOT_WIRED)
