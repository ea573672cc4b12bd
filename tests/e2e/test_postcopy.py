"""Postcopy between real pyvm processes: a guest that precopy cannot catch up with.

The guest is memcheck rewriting 16 MiB generation after generation, each page checked
against the previous generation (a page from the wrong time fails the guest's own check);
at 4 MiB/s precopy never converges.  With ``postcopy-ram`` on both sides and
``migrate-start-postcopy`` after a few rounds the migration completes.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.conftest import guest
from tests.vmproc import QmpFailed, VmProcess
from tests.waiting import wait_until
from pyvm.userfault import unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or "")

RAM = 32 << 20
HOT = ["-m", "32M", "-kernel", guest("memcheck.elf"), "-append", "start=1 size=16",
       "-display", "none"]
POSTCOPY = [{"capability": "postcopy-ram", "state": True}, {"capability": "events", "state": True}]


def _start(vms, *dst_extra: str, caps: list | None = None) -> tuple[VmProcess, VmProcess]:
    src = vms("src", *HOT)
    src.wait_serial("memcheck gen 2 ok", timeout=60)
    dst = vms("dst", *HOT, *dst_extra, "-incoming", "defer")
    for vm in (src, dst):
        vm.cmd("migrate-set-capabilities", capabilities=caps or POSTCOPY)
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = dst.cmd("query-migrate")["socket-address"][0]["port"]
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 4 << 20})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    # precopy does not converge: two full passes and still active
    def syncs() -> int:
        info = src.cmd("query-migrate")
        assert info["status"] in ("setup", "active"), info
        return int(info.get("ram", {}).get("dirty-sync-count", 0))
    wait_until(lambda: syncs() >= 3, 60, "three syncs")
    return src, dst


def _statuses(vm: VmProcess) -> list[str]:
    events = vm.events_until(lambda got: any(e["event"] == "MIGRATION" and e["data"]["status"] in
                                             ("completed", "failed") for e in got))
    return [e["data"]["status"] for e in events if e["event"] == "MIGRATION"]


def _gens(text: str) -> list[int]:
    return [int(line.split()[2]) for line in text.split("\r\n")[:-1]
            if line.startswith("memcheck gen ") and line.endswith(" ok")]


def test_postcopy_completes_and_the_guest_keeps_its_memory(vms) -> None:
    src, dst = _start(vms)
    # background pages at 4 MiB/s: the guest, running on the destination, needs pages
    # before they come and asks for them
    src.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 4 << 20})
    src.cmd("migrate-start-postcopy")
    wait_until(lambda: src.cmd("query-migrate")["status"] != "active", 30, "the switch")
    info = src.cmd("query-migrate")
    assert info["status"] in ("postcopy-active", "completed"), info
    done = src.wait_migration(("completed", "failed", "postcopy-paused"), timeout=60)
    assert done["status"] == "completed", done
    assert dst.wait_migration(("completed", "failed", "postcopy-paused"))["status"] == "completed"
    assert src.status() == "postmigrate"
    assert dst.status() == "running"
    ram = done["ram"]
    assert ram["postcopy-bytes"] > 0 and ram["postcopy-requests"] > 0, ram
    assert "downtime" in done and "expected-downtime" not in done
    # the events QEMU emits, in order, on the source
    statuses = _statuses(src)
    assert statuses[-3:] == ["active", "postcopy-active", "completed"], statuses
    dst_statuses = _statuses(dst)
    assert "postcopy-active" in dst_statuses and dst_statuses[-1] == "completed", dst_statuses
    # without the postcopy-blocktime capability there is no blocktime
    dst_info = dst.cmd("query-migrate")
    assert "postcopy-blocktime" not in dst_info and "postcopy-vcpu-blocktime" not in dst_info
    # the guest runs on: generations go on from the source's, and no page was stale
    last_src = max(_gens(src.serial()))
    out = dst.wait_serial(" ok\r\n", count=2, timeout=60)
    assert "FAIL" not in out, out
    gens = _gens(out)
    assert gens and gens[0] == last_src + 1, (last_src, gens)


@pytest.mark.postcopy_full
def test_postcopy_blocktime(vms) -> None:
    """With ``postcopy-blocktime`` on the destination, the completed destination reports
    how long its vCPUs waited for pages: more than nothing (the guest rewrites memory the
    background pages have not reached), less than the whole postcopy phase."""
    caps = POSTCOPY + [{"capability": "postcopy-blocktime", "state": True}]
    src, dst = _start(vms, caps=caps)
    src.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 4 << 20})
    started = time.monotonic()
    src.cmd("migrate-start-postcopy")
    assert dst.wait_migration(("completed", "failed", "postcopy-paused"),
                              timeout=60)["status"] == "completed"
    wall_ms = (time.monotonic() - started) * 1000
    assert src.wait_migration(timeout=60)["status"] == "completed"
    info = dst.cmd("query-migrate")
    total, per_vcpu = info["postcopy-blocktime"], info["postcopy-vcpu-blocktime"]
    assert len(per_vcpu) == 1, info
    assert 0 < total <= wall_ms, (total, wall_ms)
    assert per_vcpu[0] >= total, info      # one vCPU: it waited whenever the guest did
    text = dst.hmp("info migrate").replace("\r\n", "\n")
    assert f"\npostcopy blocktime: {total}\n" in text, text
    assert f"\npostcopy vcpu blocktime: {per_vcpu[0]}\n" in text, text
    # the source side never reports a blocktime (QEMU fills it on the destination only)
    assert "postcopy-blocktime" not in src.cmd("query-migrate")


def test_postcopy_ram_equals_the_source_at_switchover(vms) -> None:
    """Destination with -S: nothing runs there, so once every page is in, its RAM is the
    source's RAM as the source stopped."""
    src, dst = _start(vms, "-S")
    src.cmd("migrate-start-postcopy")
    assert src.wait_migration(timeout=60)["status"] == "completed"
    assert dst.wait_migration(("completed", "failed", "postcopy-paused"))["status"] == "completed"
    assert dst.status() == "paused"
    assert src.pmem(RAM) == dst.pmem(RAM)
    dst.cmd("cont")
    out = dst.wait_serial(" ok\r\n", count=2, timeout=60)
    assert "FAIL" not in out, out


def test_postcopy_refusals(vms) -> None:
    src, dst = _start(vms)
    with pytest.raises(QmpFailed) as e:
        src.cmd("migrate-pause")
    assert e.value.desc == ("migrate-pause is currently only supported during postcopy-active "
                            "or postcopy-recover state")
    src.cmd("migrate-start-postcopy")
    assert src.wait_migration(timeout=60)["status"] == "completed"
    assert dst.wait_migration(("completed", "failed", "postcopy-paused"))["status"] == "completed"


def test_destination_without_postcopy_refuses_the_advise(vms) -> None:
    src = vms("src", *HOT)
    dst = vms("dst", *HOT, "-incoming", "tcp:127.0.0.1:0")
    port = dst.cmd("query-migrate")["socket-address"][0]["port"]
    src.cmd("migrate-set-capabilities", capabilities=POSTCOPY)
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert dst.wait_exit(30) == 1
    assert "RAM postcopy is disabled but have 16 byte advise" in dst.stderr()
    assert src.wait_migration()["status"] == "failed"
    assert src.status() == "running"


class _Relay:
    """A TCP relay between source and destination that the test can cut: both of its
    connections are shut at once, as a failing network would leave them."""

    def __init__(self, port: str) -> None:
        self.target = int(port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        try:
            a, _ = self.listener.accept()
        except OSError:
            return
        b = socket.create_connection(("127.0.0.1", self.target))
        self.conns += [a, b]
        for x, y in ((a, b), (b, a)):
            t = threading.Thread(target=self._pump, args=(x, y), daemon=True)
            t.start()
            self.threads.append(t)

    @staticmethod
    def _pump(x: socket.socket, y: socket.socket) -> None:
        # Pass the end on, as a direct connection would: an orderly close as a close, a
        # reset (a killed process with unread data in its socket resets it) as a cut.
        how = socket.SHUT_RDWR
        try:
            while data := x.recv(1 << 16):
                y.sendall(data)
            how = socket.SHUT_WR
        except OSError:
            pass
        try:
            y.shutdown(how)
        except OSError:
            pass

    def cut(self) -> None:
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.listener.close()
        for t in self.threads:
            t.join(10)
        for c in self.conns:
            c.close()


def _postcopy_through(vms, relay_to_dst: bool = True):
    src = vms("src", *HOT)
    src.wait_serial("memcheck gen 2 ok", timeout=60)
    dst = vms("dst", *HOT, "-incoming", "defer")
    for vm in (src, dst):
        vm.cmd("migrate-set-capabilities", capabilities=POSTCOPY)
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = dst.cmd("query-migrate")["socket-address"][0]["port"]
    relay = _Relay(port)
    # slow background pages: the cut comes while postcopy is still running
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 4 << 20, "max-postcopy-bandwidth": 256 << 10})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{relay.port}")
    src.cmd("migrate-start-postcopy")
    src.wait_migration(("postcopy-active",), timeout=60)
    dst.wait_migration(("postcopy-active",), timeout=30)
    return src, dst, relay


def test_connection_cut_during_postcopy_pauses_both_sides(vms) -> None:
    src, dst, relay = _postcopy_through(vms)
    relay.cut()
    s = src.wait_migration(("postcopy-paused", "failed", "completed"), timeout=30)
    assert s["status"] == "postcopy-paused", s
    assert "error-desc" in s and "downtime" in s
    d = dst.wait_migration(("postcopy-paused", "failed", "completed"), timeout=30)
    assert d["status"] == "postcopy-paused", d
    # neither side resumes on its own; both monitors still answer
    assert src.status() == "finish-migrate"
    assert dst.status() == "running"
    with pytest.raises(QmpFailed) as e:
        src.cmd("migrate_cancel")
    assert e.value.desc == "Postcopy migration in progress, cannot cancel."
    with pytest.raises(QmpFailed) as e:
        src.cmd("migrate", uri="tcp:127.0.0.1:1")
    assert e.value.desc == "There's a migration process in progress"
    assert src.cmd("query-migrate")["status"] == "postcopy-paused"
    assert dst.cmd("query-migrate")["status"] == "postcopy-paused"


def test_source_killed_after_switchover_leaves_the_destination_paused(vms) -> None:
    src, dst, relay = _postcopy_through(vms)
    src.proc.kill()
    d = dst.wait_migration(("postcopy-paused", "failed", "completed"), timeout=30)
    assert d["status"] == "postcopy-paused", d
    assert dst.proc.poll() is None            # the destination stays up, waiting
    assert dst.status() == "running"
    relay.cut()


def _recover(src: VmProcess, dst: VmProcess) -> None:
    dst.cmd("migrate-recover", uri="tcp:127.0.0.1:0")
    port = dst.cmd("query-migrate")["socket-address"][0]["port"]
    src.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}", resume=True)
    done = src.wait_migration(("completed", "postcopy-paused", "failed"), timeout=60)
    assert done["status"] == "completed", (done, dst.stderr()[-2000:])
    assert dst.wait_migration(("completed", "postcopy-paused", "failed"))["status"] == "completed"
    assert src.status() == "postmigrate"
    assert dst.status() == "running"
    # the guest goes on with every page right: the pages in flight when the connection
    # broke were sent again
    last_src = max(_gens(src.serial()))
    out = dst.wait_serial(" ok\r\n", count=2, timeout=60)
    assert "FAIL" not in out, out
    assert _gens(out)[0] == last_src + 1


def test_recovery_after_a_cut_connection(vms) -> None:
    src, dst, relay = _postcopy_through(vms)
    relay.cut()
    assert src.wait_migration(("postcopy-paused",), timeout=30)["status"] == "postcopy-paused"
    assert dst.wait_migration(("postcopy-paused",), timeout=30)["status"] == "postcopy-paused"
    with pytest.raises(QmpFailed) as e:
        src.cmd("migrate-recover", uri="tcp:127.0.0.1:0")   # the source is not the one to listen
    assert e.value.desc == "Migrate recover can only be run when postcopy is paused."
    _recover(src, dst)


def test_migrate_pause_then_recover(vms) -> None:
    src, dst, relay = _postcopy_through(vms)
    src.cmd("migrate-pause")
    assert src.wait_migration(("postcopy-paused",), timeout=30)["status"] == "postcopy-paused"
    assert dst.wait_migration(("postcopy-paused",), timeout=30)["status"] == "postcopy-paused"
    with pytest.raises(QmpFailed) as e:
        src.cmd("migrate-pause")
    assert e.value.desc == ("migrate-pause is currently only supported during postcopy-active "
                            "or postcopy-recover state")
    _recover(src, dst)
    relay.cut()
