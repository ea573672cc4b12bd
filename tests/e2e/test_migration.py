"""Live migration between real pyvm processes, over every transport, and its failure paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import guest
from tests.vmproc import QmpFailed, VmProcess
from tests.waiting import wait_until

RAM = 32 << 20
MEMCHECK = ["-m", "32M", "-kernel", guest("memcheck.elf"), "-append", "start=1 size=4",
            "-display", "none"]


def _check_continues(src: VmProcess, dst: VmProcess) -> None:
    """The destination carries on the source's generations without a FAIL line."""
    last_src = src.serial().rstrip().splitlines()[-1]
    out = dst.wait_serial(" ok\r\n", count=2)   # two generations checked on the destination
    assert "FAIL" not in out, out
    complete = out.split("\r\n")[:-1]          # the guest may be mid-line right now
    gens = [int(line.split()[2]) for line in complete if line.startswith("memcheck gen ")]
    assert len(gens) >= 2 and gens == list(range(gens[0], gens[0] + len(gens)))
    if last_src.startswith("memcheck gen ") and len(last_src.split()) > 2:
        assert gens[0] == int(last_src.split()[2]) + 1


def _migrate_live(vms, uri_or_channels, dst_incoming: str, via_channels: bool = False):
    src = vms("src", *MEMCHECK)
    src.wait_serial("memcheck gen 2 ok")
    dst = vms("dst", *MEMCHECK, "-S", "-incoming", dst_incoming)
    info = dst.cmd("query-migrate")
    if dst_incoming.startswith("tcp:"):
        port = info["socket-address"][0]["port"]
        assert port != "0"
        uri_or_channels = uri_or_channels.replace("PORT", port) if isinstance(uri_or_channels, str) \
            else [{**c, "addr": {**c["addr"], "port": port}} for c in uri_or_channels]
    if via_channels:
        src.cmd("migrate", channels=uri_or_channels)
    else:
        src.cmd("migrate", uri=uri_or_channels)
    done = src.wait_migration()
    assert done["status"] == "completed", done
    assert dst.wait_migration(("completed", "failed"))["status"] == "completed"
    assert src.status() == "postmigrate"
    assert dst.status() == "paused"            # source was running, destination has -S
    assert src.pmem(RAM) == dst.pmem(RAM)      # byte-equal at switchover
    dst.cmd("cont")
    _check_continues(src, dst)
    return src, dst, done


def test_tcp_uri(vms, tmp_path: Path) -> None:
    src, dst, done = _migrate_live(vms, "tcp:127.0.0.1:PORT", "tcp:127.0.0.1:0")
    ram = done["ram"]
    assert ram["total"] == RAM
    assert ram["duplicate"] + ram["normal"] >= RAM // 4096
    assert ram["normal-bytes"] == ram["normal"] * 4096
    assert ram["dirty-sync-count"] >= 2
    assert {"setup-time", "downtime", "total-time"} <= set(done)
    assert "expected-downtime" not in done


def test_tcp_ipv6_channels(vms) -> None:
    ch = [{"channel-type": "main",
           "addr": {"transport": "socket", "type": "inet", "host": "::1", "port": "PORT"}}]
    _migrate_live(vms, ch, "tcp:[::1]:0", via_channels=True)


def test_unix_uri_and_channels(vms, tmp_path: Path) -> None:
    sock = tmp_path / "mig.sock"
    _migrate_live(vms, f"unix:{sock}", f"unix:{sock}")


def test_unix_channels(vms, tmp_path: Path) -> None:
    sock = str(tmp_path / "mig2.sock")
    ch = [{"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": sock}}]
    _migrate_live(vms, ch, f"unix:{sock}", via_channels=True)


@pytest.mark.parametrize("form", ["file-uri", "file-channel", "exec-uri", "exec-channel"])
def test_save_and_restore(vms, tmp_path: Path, form: str) -> None:
    state = tmp_path / "vm.state"
    src = vms("src", *MEMCHECK)
    src.wait_serial("memcheck gen 2 ok")
    if form == "file-uri":
        src.cmd("migrate", uri=f"file:{state},offset=0x1000")
        incoming = f"file:{state},offset=4K"
    elif form == "file-channel":
        src.cmd("migrate", channels=[{"channel-type": "main", "addr": {
            "transport": "file", "filename": str(state), "offset": 512}}])
        incoming = f"file:{state},offset=512"
    elif form == "exec-uri":
        src.cmd("migrate", uri=f"exec:cat > {state}")
        incoming = f"exec:cat {state}"
    else:
        src.cmd("migrate", channels=[{"channel-type": "main", "addr": {
            "transport": "exec", "args": ["dd", f"of={state}", "status=none"]}}])
        incoming = f"exec:cat {state}"
    assert src.wait_migration()["status"] == "completed"
    ram = src.pmem(RAM)
    src.cmd("quit")
    dst = vms("dst", *MEMCHECK, "-S", "-incoming", incoming)
    assert dst.wait_migration(("completed", "failed"))["status"] == "completed", dst.stderr()
    assert dst.pmem(RAM) == ram
    dst.cmd("cont")
    _check_continues(src, dst)


def _save_running_guest(vms, state: Path, generation: int) -> VmProcess:
    """A memcheck guest saved to ``state`` once it finished ``generation``; the source."""
    src = vms("src", *MEMCHECK)
    src.wait_serial(f"memcheck gen {generation} ok")
    src.cmd("migrate", uri=f"file:{state}")
    assert src.wait_migration()["status"] == "completed"
    return src


def test_restore_runs_without_S(vms, tmp_path: Path) -> None:
    state = tmp_path / "vm.state"
    src = _save_running_guest(vms, state, 1)
    dst = vms("dst", *MEMCHECK, "-incoming", f"file:{state}")
    dst.wait_migration(("completed",))
    assert dst.status() == "running"
    _check_continues(src, dst)


def test_paused_source_restores_paused(vms, tmp_path: Path) -> None:
    state = tmp_path / "vm.state"
    src = vms("src", *MEMCHECK)
    src.wait_serial("memcheck gen 1 ok")
    src.cmd("stop")
    src.cmd("migrate", uri=f"file:{state}")
    done = src.wait_migration()
    assert done["ram"]["precopy-bytes"] == 0 and done["ram"]["downtime-bytes"] > 0
    dst = vms("dst", *MEMCHECK, "-incoming", f"file:{state}")
    dst.wait_migration(("completed",))
    assert dst.status() == "paused"


def test_ab_smp_consistency(vms) -> None:
    args = ["-m", "32M", "-smp", "2", "-kernel", guest("ab.elf"), "-append", "start=1 size=8",
            "-display", "none"]
    src = vms("src", *args)
    src.wait_serial("BBBB")
    dst = vms("dst", *args, "-S", "-incoming", "tcp:127.0.0.1:0")
    port = dst.cmd("query-migrate")["socket-address"][0]["port"]
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert src.wait_migration()["status"] == "completed"
    dst.wait_migration(("completed",))
    ram = dst.pmem(RAM)
    for cpu in range(2):                      # each vCPU owns half of 1..9 MiB
        first = (1 << 20) + cpu * (4 << 20)
        values = [ram[first + i * 4096] for i in range(1024)]
        x = values[-1]
        k = sum(1 for v in values if v == (x + 1) % 256)
        assert all(v == (x + 1) % 256 for v in values[:k]) and all(v == x for v in values[k:]), values[:8]
    before = dst.serial()
    dst.cmd("cont")
    dst.wait_serial("B", count=before.count("B") + 1)


def test_events_and_stop_on_source(vms) -> None:
    src = vms("src", *MEMCHECK)
    dst = vms("dst", *MEMCHECK, "-incoming", "tcp:127.0.0.1:0")
    port = dst.cmd("query-migrate")["socket-address"][0]["port"]
    for vm in (src, dst):
        vm.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")

    def completed(events: list[dict]) -> bool:
        return {"event": "MIGRATION", "data": {"status": "completed"}} in [
            {k: e.get(k) for k in ("event", "data")} for e in events]
    src_events = src.events_until(completed)
    dst_events = dst.events_until(completed)
    ev = [(e["event"], e.get("data")) for e in src_events]
    names = [n for n, _ in ev]
    statuses = [d["status"] for n, d in ev if n == "MIGRATION"]
    assert statuses == ["setup", "active", "completed"], ev
    assert "STOP" in names and names.index("STOP") < names.index("MIGRATION", names.index("STOP"))
    passes = [d["pass"] for n, d in ev if n == "MIGRATION_PASS"]
    assert passes == list(range(1, len(passes) + 1)) and len(passes) >= 2
    assert names.index("MIGRATION_PASS") < statuses.index("active") + names.index("MIGRATION") + 1
    dev = [(e["event"], e.get("data")) for e in dst_events]
    dnames = [n for n, _ in dev]
    assert ("MIGRATION", {"status": "completed"}) in dev and "RESUME" in dnames
    assert dnames.index("RESUME") < dev.index(("MIGRATION", {"status": "completed"}))


def test_pause_before_switchover(vms) -> None:
    src = vms("src", *MEMCHECK)
    dst = vms("dst", *MEMCHECK, "-incoming", "tcp:127.0.0.1:0")
    port = dst.cmd("query-migrate")["socket-address"][0]["port"]
    src.cmd("migrate-set-capabilities",
            capabilities=[{"capability": "pause-before-switchover", "state": True}])
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    src.wait_migration(("pre-switchover",))
    assert src.status() == "finish-migrate"
    with pytest.raises(QmpFailed, match="Migration not in expected state: pre-switchover"):
        src.cmd("migrate-continue", state="active")
    src.cmd("migrate-continue", state="pre-switchover")
    assert src.wait_migration()["status"] == "completed"
    dst.wait_migration(("completed",))
    _check_continues(src, dst)


def test_split_run_equivalence(vms) -> None:
    """memcheck for 30 generations, migrated part way, ends with the same output and RAM as
    an uninterrupted run (no debug-exit device: the guest halts at the end)."""
    args = ["-m", "32M", "-kernel", guest("memcheck.elf"), "-append", "start=1 size=2 gens=30",
            "-display", "none"]
    ref = vms("ref", *args)
    ref.wait_serial("memcheck done\r\n")
    wait_until(ref.halted, 10, "ref halted after memcheck done")
    ref_ram, ref_out = ref.pmem(RAM), ref.serial()
    src = vms("src", *args)
    src.wait_serial("memcheck gen 5 ok")
    dst = vms("dst", *args, "-incoming", "tcp:127.0.0.1:0")
    port = dst.cmd("query-migrate")["socket-address"][0]["port"]
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert src.wait_migration()["status"] == "completed"
    dst.wait_serial("memcheck done\r\n")
    wait_until(dst.halted, 10, "dst halted after memcheck done")
    assert src.serial() + dst.serial() == ref_out
    assert dst.pmem(RAM) == ref_ram


# -- failures ----------------------------------------------------------------------------------

def _assert_source_survives(src: VmProcess, ram_before: bytes | None = None) -> None:
    assert src.status() == "running"
    n = src.serial().count("ok")
    src.wait_serial("ok", timeout=15, count=n + 1)   # the guest makes progress again
    assert "FAIL" not in src.serial()


def test_connection_refused(vms) -> None:
    src = vms("src", *MEMCHECK)
    src.cmd("migrate", uri="tcp:127.0.0.1:1")
    info = src.wait_migration()
    assert info["status"] == "failed"
    assert info["error-desc"] == "Failed to connect to '127.0.0.1:1': Connection refused"
    _assert_source_survives(src)


def _slow_live_migration(vms, bandwidth: int):
    """A memcheck guest dirtying 16 MiB, migrating over tcp at ``bandwidth`` bytes/s: still
    ``active`` when this returns."""
    args = ["-m", "32M", "-kernel", guest("memcheck.elf"), "-append", "start=1 size=16",
            "-display", "none"]
    src = vms("src", *args)
    dst = vms("dst", *args, "-incoming", "tcp:127.0.0.1:0")
    port = dst.cmd("query-migrate")["socket-address"][0]["port"]
    src.cmd("migrate-set-parameters", **{"max-bandwidth": bandwidth})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    src.wait_migration(("active",))
    return src, dst, port


def test_destination_killed_mid_transfer(vms) -> None:
    src, dst, _ = _slow_live_migration(vms, 4 << 20)
    # pages are flowing (and far from all of them: 16 MiB dirty at 4 MiB/s)
    wait_until(lambda: src.cmd("query-migrate")["ram"]["transferred"] > 1 << 20, 20,
               "1 MiB transferred")
    dst.proc.kill()
    info = src.wait_migration()
    assert info["status"] == "failed" and "error-desc" in info, info
    _assert_source_survives(src)


def test_exec_command_fails(vms) -> None:
    src = vms("src", *MEMCHECK)
    src.cmd("migrate", uri="exec:exit 3")
    info = src.wait_migration()
    assert info["status"] == "failed" and info["error-desc"], info
    _assert_source_survives(src)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full(vms) -> None:
    src = vms("src", *MEMCHECK)
    src.cmd("migrate", uri="file:/dev/full")
    info = src.wait_migration()
    assert info["status"] == "failed"
    assert "No space left on device" in info["error-desc"]
    _assert_source_survives(src)


def test_cancel_resumes(vms) -> None:
    src, dst, _ = _slow_live_migration(vms, 2 << 20)
    src.cmd("migrate_cancel")
    assert src.wait_migration(("cancelled",))["status"] == "cancelled"
    _assert_source_survives(src)
    assert dst.wait_exit(20) == 1               # the destination of a cancelled run fails


def test_truncated_stream(vms, tmp_path: Path) -> None:
    state = tmp_path / "vm.state"
    src = vms("src", *MEMCHECK)
    src.wait_serial("ok")
    src.cmd("migrate", uri=f"file:{state}")
    src.wait_migration()
    data = state.read_bytes()
    cut = tmp_path / "cut.state"
    cut.write_bytes(data[: len(data) // 2])
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "pyvm", *MEMCHECK, "-incoming", f"file:{cut}"],
                       capture_output=True, timeout=30)
    assert r.returncode == 1
    assert b"load of migration failed" in r.stderr and b"Traceback" not in r.stderr
    dst = vms("dst", *MEMCHECK, "-incoming", "defer")
    dst.cmd("migrate-incoming", uri=f"file:{cut}", **{"exit-on-error": False})
    info = dst.wait_migration(("failed",))
    assert info["status"] == "failed" and info["error-desc"]
    assert dst.status() == "inmigrate"
    assert dst.proc.poll() is None


def test_corrupt_stream_magic(tmp_path: Path) -> None:
    import subprocess
    import sys
    bad = tmp_path / "bad.state"
    bad.write_bytes(b"NOPE" + bytes(100))
    r = subprocess.run([sys.executable, "-m", "pyvm", *MEMCHECK, "-incoming", f"file:{bad}"],
                       capture_output=True, timeout=30)
    assert r.returncode == 1 and b"Not a migration stream" in r.stderr


def test_command_errors(vms, tmp_path: Path) -> None:
    src = vms("src", *MEMCHECK)
    with pytest.raises(QmpFailed) as e:
        src.cmd("migrate", uri="tcp:127.0.0.1:1", channels=[])
    assert e.value.desc == ("'uri' and 'channels' arguments are mutually exclusive; exactly one of "
                            "the two should be present in 'migrate' qmp command ")
    with pytest.raises(QmpFailed) as e:
        src.cmd("migrate")
    assert e.value.desc == "neither 'uri' or 'channels' argument are specified in 'migrate' qmp command "
    with pytest.raises(QmpFailed, match="unknown migration protocol: foo:bar"):
        src.cmd("migrate", uri="foo:bar")
    with pytest.raises(QmpFailed, match="'-incoming' was not specified on the command line"):
        src.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    with pytest.raises(QmpFailed, match="Parameter 'downtime-limit' expects uint64"):
        src.cmd("migrate-set-parameters", **{"downtime-limit": "x"})
    with pytest.raises(QmpFailed, match=r"Parameter 'downtime_limit' expects an integer in the range "
                                        r"of 0 to \(2000 \* 1000\) ms"):
        src.cmd("migrate-set-parameters", **{"downtime-limit": 2000001})
    with pytest.raises(QmpFailed, match="x-colo"):
        src.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-colo", "state": True}])
    caps = src.cmd("query-migrate-capabilities")
    assert [c["capability"] for c in caps][:3] == ["xbzrle", "rdma-pin-all", "auto-converge"]
    assert len(caps) == 25                     # QEMU 8.2's 23, 9.0's mapped-ram, pyvm's x-checksum
    assert caps[-1]["capability"] == "x-checksum"
    assert src.cmd("query-migrate-parameters")["mode"] == "normal"
    assert src.cmd("query-migrate") == {}
    state = tmp_path / "s"
    src.cmd("migrate", uri=f"file:{state}")
    src.wait_migration()
    with pytest.raises(QmpFailed, match="Can't migrate the vm that was paused due to previous migration"):
        src.cmd("migrate", uri=f"file:{state}")
    dst = vms("dst", *MEMCHECK, "-incoming", "defer")
    with pytest.raises(QmpFailed, match="Guest is waiting for an incoming migration"):
        dst.cmd("migrate", uri=f"file:{tmp_path / 'x'}")
    with pytest.raises(QmpFailed, match="Guest is waiting for an incoming migration"):
        dst.cmd("cont")
    dst.cmd("migrate-incoming", uri=f"file:{state}")
    with pytest.raises(QmpFailed, match="The incoming migration has already been started"):
        dst.cmd("migrate-incoming", uri=f"file:{state}")
    dst.wait_migration(("completed",))


def test_migration_in_progress_refuses_capabilities(vms) -> None:
    src, dst, port = _slow_live_migration(vms, 4 << 20)
    with pytest.raises(QmpFailed, match="There's a migration process in progress"):
        src.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    with pytest.raises(QmpFailed, match="There's a migration process in progress"):
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info = src.cmd("query-migrate")
    assert {"status", "ram", "expected-downtime", "setup-time", "total-time"} <= set(info)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 30})
    assert src.wait_migration()["status"] == "completed"


def test_hmp_migration_commands(vms, tmp_path: Path) -> None:
    src = vms("src", *MEMCHECK)
    src.hmp("migrate_set_capability events on")
    src.hmp("migrate_set_parameter downtime-limit 500")
    assert "events: on" in src.hmp("info migrate_capabilities")
    assert "downtime-limit: 500 ms" in src.hmp("info migrate_parameters")
    src.hmp(f"migrate -d file:{tmp_path / 'h.state'}")
    src.wait_migration()
    assert "Migration status: completed" in src.hmp("info migrate")


def test_reset_while_waiting_for_a_migration_leaves_ram_to_the_stream(vms, tmp_path: Path) -> None:
    # In 'inmigrate' guest RAM belongs to the incoming stream: system_reset resets devices
    # and vCPUs but must not write the boot image, which the loader (whose map of pages
    # still zero comes from the untouched RAM) would then leave where the stream has zeros.
    state = tmp_path / "vm.state"
    ram = _save_running_guest(vms, state, 2).pmem(RAM)
    dst = vms("dst", *MEMCHECK, "-S", "-incoming", "defer")
    dst.cmd("system_reset")
    assert dst.pmem(RAM) == bytes(RAM)
    dst.cmd("migrate-incoming", uri=f"file:{state}")
    assert dst.wait_migration(("completed", "failed"))["status"] == "completed", dst.stderr()
    assert dst.pmem(RAM) == ram
