"""Debian 12's stock kernel (linux-image-amd64) boots to a busybox shell in pyvm."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tests.linux import BOOT_TIMEOUT, PROMPT, SerialConsole, linux_args, linux_files

pytestmark = [pytest.mark.slow, pytest.mark.linux]
# Until QMP answers: the kernel's payload is unpacked first (about 1 s of CPU when idle).
START_TIMEOUT = 120.0


def _boot(vms, tmp_path: Path, name: str, *extra: str):
    sock = tmp_path / f"{name}.serial.sock"
    vm = vms(name, *linux_args(), *extra, "-serial", f"unix:{sock},server=on,wait=off",
             serial=False, connect_timeout=START_TIMEOUT)
    return vm, SerialConsole(sock)


def test_boots_to_a_shell_and_answers(vms, tmp_path: Path) -> None:
    vm, con = _boot(vms, tmp_path, "linux")
    try:
        con.expect(PROMPT, BOOT_TIMEOUT)
        assert "Linux version 6.1" in con.out
        # The kernel saw the e820 map and the initrd where pyvm put them.
        assert "BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable" in con.out
        initrd_size = linux_files()[1].stat().st_size
        top = ((512 << 20) - initrd_size) & ~0xFFF
        assert f"RAMDISK: [mem {top:#010x}-0x1fffffff]" in con.out
        a, b = random.randint(100, 999), random.randint(100, 999)
        con.run(f"echo $(({a}*{b}))", str(a * b))
        # One processor, no local APIC (CPUID hides it), the -append command line.
        con.run("grep -c ^processor /proc/cpuinfo", "1")
        con.run("grep -q ' apic ' /proc/cpuinfo || echo no-apic", "no-apic")
        con.run("cat /proc/cmdline", "console=ttyS0")
        # A background loop that makes system calls without pause: every time slice ends
        # at a SYSCALL with IF=0, and the serial IRQ must still reach the shell.
        con.run("while :; do date > /tmp/clock; done & echo started", "started")
        con.run(f"echo $(({b}*{a}+1))", str(a * b + 1), timeout=120)
        con.run("kill %1; echo stopped", "stopped", timeout=120)
        assert vm.status() == "running"
    finally:
        con.close()


MIG_RAM = "256M"


def _answers_on(con: SerialConsole) -> None:
    con.sock.sendall(b"\r")                     # a fresh prompt from the destination
    con.expect(PROMPT, 60, len(con.out))
    con.run("echo $X$((6*7))", "424242")
    con.run("cat /proc/uptime > /dev/null && echo alive", "alive")


def _vm(vms, name: str, tmp_path: Path, *extra: str):
    """A Linux VM with its serial port on a unix socket, and the console on it."""
    vm = vms(name, *_linux(name, tmp_path, *extra), serial=False, connect_timeout=START_TIMEOUT)
    return vm, SerialConsole(tmp_path / f"{name}.serial.sock")


def _linux(name: str, tmp_path: Path, *extra: str) -> list[str]:
    sock = tmp_path / f"{name}.serial.sock"
    return [*linux_args(MIG_RAM), *extra, "-serial", f"unix:{sock},server=on,wait=off"]


def test_live_migration_over_tcp_at_the_prompt(vms, tmp_path: Path) -> None:
    src, scon = _vm(vms, "src", tmp_path)
    scon.expect(PROMPT, BOOT_TIMEOUT)
    scon.run("X=4242; echo set-$X", "set-4242")
    dst, dcon = _vm(vms, "dst", tmp_path, "-incoming", "tcp:127.0.0.1:0")
    port = dst.cmd("query-migrate")["socket-address"][0]["port"]
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    done = src.wait_migration(timeout=300)
    assert done["status"] == "completed", done
    assert dst.wait_migration(("completed", "failed"), timeout=60)["status"] == "completed"
    assert src.status() == "postmigrate"
    assert dst.status() == "running"
    _answers_on(dcon)
    scon.close()
    dcon.close()


def test_save_to_file_and_restore(vms, tmp_path: Path) -> None:
    state = tmp_path / "linux.state"
    src, scon = _vm(vms, "src", tmp_path)
    scon.expect(PROMPT, BOOT_TIMEOUT)
    scon.run("X=4242; echo set-$X", "set-4242")
    src.cmd("migrate", uri=f"file:{state}")
    assert src.wait_migration(timeout=300)["status"] == "completed"
    src.cmd("quit")
    scon.close()
    dst, dcon = _vm(vms, "dst", tmp_path, "-incoming", f"file:{state}")
    assert dst.wait_migration(("completed", "failed"), timeout=120)["status"] == "completed"
    assert dst.status() == "running"
    _answers_on(dcon)
    dcon.close()


def test_cpr_reboot_with_a_shared_memory_backend(vms, tmp_path: Path, tmp_shm: Path) -> None:
    ram, state = tmp_shm / "linux.ram", tmp_path / "linux.state"
    backend = ["-object", f"memory-backend-file,id=ram0,size={MIG_RAM},mem-path={ram},share=on",
               "-machine", "memory-backend=ram0"]
    caps = [{"capability": "x-ignore-shared", "state": True}]
    src, scon = _vm(vms, "src", tmp_path, *backend)
    scon.expect(PROMPT, BOOT_TIMEOUT)
    scon.run("X=4242; echo set-$X", "set-4242")
    src.cmd("migrate-set-parameters", mode="cpr-reboot")
    src.cmd("migrate-set-capabilities", capabilities=caps)
    src.cmd("migrate", uri=f"file:{state}")
    assert src.wait_migration(timeout=120)["status"] == "completed"
    src.cmd("quit")
    src.wait_exit()
    scon.close()
    assert state.stat().st_size < 256 * 1024          # guest RAM stayed in the shared file
    dst, dcon = _vm(vms, "dst", tmp_path, *backend, "-incoming", "defer")
    dst.cmd("migrate-set-parameters", mode="cpr-reboot")
    dst.cmd("migrate-set-capabilities", capabilities=caps)
    dst.cmd("migrate-incoming", uri=f"file:{state}")
    assert dst.wait_migration(("completed", "failed"), timeout=60)["status"] == "completed"
    assert dst.status() == "running"
    _answers_on(dcon)
    dcon.close()


def test_live_migration_while_the_guest_writes_files(vms, tmp_path: Path) -> None:
    """Linux writes 48 MiB of fresh page-cache pages while precopy runs its rounds (the
    rate limit keeps it iterating): every file reads back whole on the destination.  A
    page the dirty tracking missed would arrive stale, and some file's checksum with it."""
    src, scon = _vm(vms, "src", tmp_path)
    scon.expect(PROMPT, BOOT_TIMEOUT)
    scon.run("dd if=/dev/urandom of=/a bs=1M count=4 2>/dev/null; echo made", "made", timeout=120)
    start = len(scon.out)
    scon.sock.sendall(b"md5sum /a\r")
    scon.expect(PROMPT, 60, scon.expect("/a", 60, start))
    want = scon.out[start:].split("md5sum /a")[-1].split()[0]
    assert len(want) == 32
    dst, dcon = _vm(vms, "dst", tmp_path, "-incoming", "tcp:127.0.0.1:0")
    port = dst.cmd("query-migrate")["socket-address"][0]["port"]
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 24 << 20, "downtime-limit": 300})
    # 12 copies, one after another, each into fresh pages (the files live in RAM: more
    # would fill the guest's 256 MiB); a marker when the last is done
    scon.sock.sendall(b"(for i in $(seq 1 12); do cp /a /f$i; done; touch /copied) &\r")
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    done = src.wait_migration(timeout=300)
    assert done["status"] == "completed", done
    assert done["ram"]["dirty-sync-count"] >= 3          # it iterated while the guest wrote
    assert dst.wait_migration(("completed", "failed"), timeout=60)["status"] == "completed"
    dcon.sock.sendall(b"\r")
    dcon.expect(PROMPT, 60, len(dcon.out))
    dcon.run("while [ ! -e /copied ]; do sleep 1; done; echo copies-done", "copies-done", timeout=300)
    start = len(dcon.out)
    dcon.sock.sendall(b"md5sum /a /f* | sed 's/^/s=/'; echo sums-''end\r")
    end = dcon.expect("sums-end", 120, start)
    sums = dict(reversed(ln[2:].split()) for ln in dcon.out[start:end].splitlines()
                if ln.startswith("s="))
    assert len(sums) == 13, dcon.out[start:end]
    assert {f: h for f, h in sums.items() if h != want} == {}, f"want {want}"
    scon.close()
    dcon.close()
