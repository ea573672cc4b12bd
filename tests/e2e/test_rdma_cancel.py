"""rdma: ``migrate_cancel`` while the source is still looking the destination up.

``fi_getinfo`` cannot be interrupted, and it blocks for seconds: the first call in a
process loads and probes every libfabric provider, and a host name waits for the
resolver.  The source now does the lookup on a helper thread and watches the cancel
(pyvm/migration/transports/fabric.py), so a cancel ends the migration within a second.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from pyvm.migration.transports import fabric
from pyvm.migration.transports.base import AbortSignal, TransportCancelled
from tests.conftest import guest

needs_libfabric = pytest.mark.skipif(not fabric.available(),
                                     reason="the libfabric binding is not built")
ARGS = ["-m", "32M", "-kernel", guest("memcheck.elf"), "-append", "start=1 size=4",
        "-display", "none"]


@needs_libfabric
def test_cancel_during_the_first_rdma_lookup_ends_within_a_second(vms, tmp_path: Path) -> None:
    # a fresh process: its first fi_getinfo loads the providers (seconds on a loaded host)
    src = vms("src", *ARGS)
    src.wait_serial("memcheck gen 1 ok")
    src.cmd("migrate", uri="rdma:pyvm-nowhere.example.com:4444")
    t0 = time.monotonic()
    src.cmd("migrate_cancel")
    info = src.wait_migration(("cancelled", "failed"), timeout=30, poll=0.01)
    assert info["status"] == "cancelled", info
    assert time.monotonic() - t0 < 1.0
    assert src.status() == "running"
    src.cmd("migrate", uri=f"file:{tmp_path / 'again.state'}")
    assert src.wait_migration()["status"] == "completed"


@needs_libfabric
def test_an_abort_interrupts_a_lookup_that_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    binding = fabric.load_binding()

    def stuck_getinfo(*_args: object) -> None:
        release.wait(30)              # a resolver that does not answer
        return None

    monkeypatch.setattr(binding, "getinfo", stuck_getinfo)
    abort = AbortSignal()
    try:
        threading.Timer(0.2, abort.trigger).start()
        t0 = time.monotonic()
        with pytest.raises(TransportCancelled, match="RDMA ERROR: looking up nowhere:4444"):
            fabric.find_info("nowhere", 4444, passive=False, abort=abort)
        assert time.monotonic() - t0 < 1.0
    finally:
        release.set()
        abort.close()


@needs_libfabric
def test_a_cancelled_lookups_thread_is_adopted_and_joined(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cancel returns at once, but the helper thread stuck in the lookup is not
    orphaned: the abort signal holds it, and its owner (the migration thread, at its end)
    joins it, so no thread outlives a cancelled rdma migration."""
    release = threading.Event()
    binding = fabric.load_binding()

    def stuck_getinfo(*_args: object) -> None:
        release.wait(30)
        return None

    monkeypatch.setattr(binding, "getinfo", stuck_getinfo)
    abort = AbortSignal()
    try:
        abort.trigger()
        with pytest.raises(TransportCancelled):
            fabric.find_info("nowhere", 4444, passive=False, abort=abort)
        helpers = [t for t in threading.enumerate() if t.name == "rdma-lookup" and t.is_alive()]
        assert helpers                                  # still inside the lookup
        assert not abort.join_adopted(timeout=0.1)      # owned: joining waits for it
        threading.Timer(0.2, release.set).start()
        assert abort.join_adopted(timeout=10)
        assert not any(t.is_alive() for t in helpers)
    finally:
        release.set()
        abort.close()
