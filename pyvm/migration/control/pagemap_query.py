"""``x-query-ram-pagemap``: what each page of guest RAM is doing in a migration.

An experimental (``x-``) query for teaching tools such as ``pyvm-migrate --pagemap``.
Every page is one character:

``.`` clean: no migration has sent it (nothing running, or not reached yet)
``z`` zero: all its bytes are zero (precopy sends such a page as a ZERO record)
``s`` sent: sent in an earlier round and not written since
``p`` pending: found dirty at the last bitmap sync, (re)sent during this round
``d`` dirty: written by the guest since the last sync (goes out next round)

The map is a snapshot taken between two vCPU time slices: the dirty bitmap is read, not
cleared, so asking does not change the migration.  With ``cells`` N, pages are grouped
into N cells and a cell shows its most urgent state (d > p > s > z > .).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from pyvm.fastpath import bitmap_to_indices, find_zero_pages_at
from pyvm.migration.control import service
from pyvm.migration.control.status import MigrationStatus
from pyvm.qmp.context import CommandContext
from pyvm.qmp.errors import CommandError
from pyvm.qmp.registry import CommandTable
from pyvm.qmp.schema import Struct

if TYPE_CHECKING:
    from pyvm.machine import Machine

PAGE = 4096
CLEAN, ZERO, SENT, PENDING, DIRTY = 0, 1, 2, 3, 4
SYMBOLS = ".zspd"
MAX_CELLS = 1 << 20

PAGEMAP_INFO = Struct("RamPagemapInfo", {
    "page-size": "int", "pages": "int", "pages-per-cell": "int", "map": "str",
    "status": "str", "dirty-sync-count": "int"})


def page_states(machine: "Machine") -> np.ndarray:
    """One state code per page of every RAM block, in guest-physical order."""
    mgr = service.migration_of(machine)
    migrating = mgr.incoming is None and mgr.status in (
        MigrationStatus.ACTIVE, MigrationStatus.PRE_SWITCHOVER, MigrationStatus.DEVICE,
        MigrationStatus.COMPLETED)
    precopy = mgr.precopy
    pending = {b.name: idx for b, idx in precopy.pending_pages()} if precopy else {}
    blocks = list(machine.ram)

    def snapshot() -> list[np.ndarray]:
        return [b.dirty.words.copy() for b in blocks]
    words = machine.run_on_loop(snapshot)
    out = []
    for block, w in zip(blocks, words):
        state = np.full(block.npages, SENT if migrating else CLEAN, dtype=np.uint8)
        # Pages the process never populated are zero without reading (and faulting) them.
        zero = np.zeros(block.npages, dtype=bool)
        unpopulated = block.unpopulated(0, block.npages) if block.npages else None
        scan = np.arange(block.npages, dtype=np.int64)
        if unpopulated is not None:
            zero |= unpopulated
            scan = scan[~unpopulated]
        mask = np.zeros(scan.size, dtype=np.uint8)
        if scan.size:
            find_zero_pages_at(block.mem, scan, mask)
        zero[scan[mask.view(bool)]] = True
        state[zero] = ZERO
        if migrating and block.name in pending:
            state[pending[block.name]] = PENDING
        if machine.dirty_logging:
            state[bitmap_to_indices(w, block.npages)] = DIRTY
        out.append(state)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.uint8)


def render(states: np.ndarray, cells: int) -> tuple[str, int]:
    """The map string and the pages per character."""
    per = max(1, -(-states.size // max(1, cells)))
    pad = (-states.size) % per
    grid = np.concatenate([states, np.zeros(pad, dtype=np.uint8)]).reshape(-1, per)
    codes = grid.max(axis=1)
    return "".join(SYMBOLS[c] for c in codes.tolist()), per


def query_pagemap(ctx: CommandContext, args: dict[str, Any]) -> dict[str, Any]:
    cells = args.get("cells", 0)
    if not 0 <= cells <= MAX_CELLS:
        raise CommandError(f"Parameter 'cells' expects a value between 0 and {MAX_CELLS}")
    machine: Any = ctx.vm                   # the monitor's VM is a pyvm.machine.Machine
    states = page_states(machine)
    text, per = render(states, cells or states.size)
    info = service.migration_of(machine).query()
    return {"page-size": PAGE, "pages": int(states.size), "pages-per-cell": per, "map": text,
            "status": info.get("status", "none"),
            "dirty-sync-count": info.get("ram", {}).get("dirty-sync-count", 0)}


def install(table: CommandTable) -> None:
    table.register("x-query-ram-pagemap", {"*cells": "int"}, PAGEMAP_INFO, query_pagemap)
