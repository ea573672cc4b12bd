"""Boot the packaged guests in real pyvm processes and check what they do."""

from __future__ import annotations


import pytest

from tests.conftest import DEBUG_EXIT, guest, run_pyvm
from tests.waiting import read_until


def test_boot_sector_real_to_protected_mode() -> None:
    r = run_pyvm("-m", "16M", "-hda", guest("boot-pm.img"), "-serial", "stdio", *DEBUG_EXIT)
    out = r.stdout.decode()
    assert "real" in out and "prot" in out, (out, r.stderr)
    assert out.index("real") < out.index("prot")
    assert r.returncode == (0x21 << 1) | 1


@pytest.mark.parametrize("image,flag,text", [
    ("timer-real.img", "-hda", "timer real ok"),
    ("timer-pm.elf", "-kernel", "timer pm ok"),
    ("timer-lm.elf", "-kernel", "timer lm ok"),
])
def test_timer_interrupts_in_every_mode(image: str, flag: str, text: str) -> None:
    r = run_pyvm("-m", "16M", flag, guest(image), "-serial", "stdio", *DEBUG_EXIT)
    assert text in r.stdout.decode(), r.stderr.decode()
    assert r.returncode == (0x10 << 1) | 1


def test_smp2_runs_ab_on_both_vcpus() -> None:
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "pyvm", "-m", "32M", "-smp", "2",
                             "-kernel", guest("ab.elf"), "-append", "start=1 size=4",
                             "-serial", "stdio"], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        # vCPU 1 prints its A some slices after vCPU 0 started printing B
        out = read_until(proc.stdout, lambda o: o.count(b"A") >= 2 and o.count(b"B") >= 4).decode()
    finally:
        proc.terminate()
    out += proc.communicate(timeout=10)[0].decode()
    assert out.count("A") == 2, out[:200]          # one 'A' per vCPU
    assert out.count("B") >= 4


def test_debug_exit_codes() -> None:
    r = run_pyvm("-m", "32M", "-kernel", guest("store-loop.elf"), "-append", "start=2 size=1 iters=3",
                 "-display", "none", *DEBUG_EXIT)
    assert r.returncode == 1, r.stderr          # (0 << 1) | 1
    r = run_pyvm("-m", "16M", "-hda", guest("boot-pm.img"), "-display", "none",
                 "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04")
    assert r.returncode == 0x43


def test_disk_reads_and_writes(tmp_path) -> None:
    img = tmp_path / "disk.img"
    boot = open(guest("disk-rw.img"), "rb").read()
    data = bytearray(boot.ljust(512, b"\0")[:512]) + b"pyvm disk sector".ljust(512, b"\0") + bytes(1024)
    img.write_bytes(data)
    r = run_pyvm("-m", "16M", "-drive", f"file={img},format=raw", "-serial", "stdio", *DEBUG_EXIT)
    out = r.stdout.decode()
    assert "pyvm disk sector" in out and "disk ok" in out, (out, r.stderr)
    assert r.returncode == (0x22 << 1) | 1
    written = img.read_bytes()[1024:1536]
    assert written == bytes(range(256)) * 2


def test_memcheck_generations() -> None:
    r = run_pyvm("-m", "32M", "-kernel", guest("memcheck.elf"), "-append", "start=1 size=4 gens=3",
                 "-serial", "stdio", *DEBUG_EXIT)
    out = r.stdout.decode()
    assert "memcheck gen 3 ok" in out and "memcheck done" in out and "FAIL" not in out, out
    assert r.returncode == 1


def test_elf64_and_cmdline() -> None:
    r = run_pyvm("-m", "16M", "-kernel", guest("timer-lm.elf"), "-serial", "stdio", *DEBUG_EXIT)
    assert r.returncode == 0x21


def test_hello_echo() -> None:
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-m", "pyvm", "-m", "16M", "-serial", "stdio"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        # "tick 1": the guest has set up its interrupts, the UART's receive one included
        out = read_until(proc.stdout, lambda o: b"tick 1" in o)
        proc.stdin.write(b"echo me\r")
        proc.stdin.flush()
        out = read_until(proc.stdout, lambda o: b"echo me\r\n" in o, got=out)
    finally:
        proc.terminate()
    text = out.decode() + proc.communicate(timeout=10)[0].decode()
    assert "pyvm hello: guest running" in text
    assert "tick 1" in text
    assert "echo me\r\n" in text


def test_guest_fault_report_no_traceback() -> None:
    r = run_pyvm("-m", "16M", "-hda", guest("fault.img"), "-serial", "stdio")
    err = r.stderr.decode()
    assert r.returncode == 1
    assert "unmapped guest address 0xf0000000" in err
    assert "EIP=f0000000" in err.replace(" ", "")
    assert "Traceback" not in err


def test_memory_backend_file_shared(tmp_shm) -> None:
    path = tmp_shm / "ram"
    r = run_pyvm("-m", "32M", "-object", f"memory-backend-file,id=ram0,size=32M,mem-path={path},share=on",
                 "-machine", "memory-backend=ram0", "-kernel", guest("memcheck.elf"),
                 "-append", "start=1 size=2 gens=2", "-display", "none", *DEBUG_EXIT)
    assert r.returncode == 1, r.stderr
    data = path.read_bytes()
    assert len(data) == 32 << 20
    # memcheck wrote its pattern into 1..3 MiB: another process (us) sees it in the file.
    assert any(data[(1 << 20) + i * 4096] for i in range(512))


def test_memory_backend_file_private_leaves_file_alone(tmp_shm) -> None:
    path = tmp_shm / "ram"
    r = run_pyvm("-object", f"memory-backend-file,id=m,size=16M,mem-path={path}",
                 "-machine", "memory-backend=m", "-kernel", guest("memcheck.elf"),
                 "-append", "start=1 size=2 gens=1", "-display", "none", *DEBUG_EXIT)
    assert r.returncode == 1, r.stderr
    assert path.read_bytes() == bytes(16 << 20)


def test_memory_backend_memfd() -> None:
    r = run_pyvm("-object", "memory-backend-memfd,id=mem,size=16M", "-machine", "memory-backend=mem",
                 "-kernel", guest("memcheck.elf"), "-append", "start=1 size=2 gens=1",
                 "-display", "none", *DEBUG_EXIT)
    assert r.returncode == 1, r.stderr


@pytest.mark.parametrize("args,needle", [
    (["-frobnicate"], "-frobnicate: invalid option"),
    (["-m"], "-m: requires an argument"),
    (["-m", "lots"], "-m lots: Parameter 'size' expects a size"),
    (["-smp", "0"], "Invalid SMP CPUs 0"),
    # more than the 47-bit user address space: ENOMEM whatever the overcommit policy
    (["-m", "99999999G"], "cannot set up guest memory 'pc.ram': Cannot allocate memory"),
    (["-kernel", "/nonexistent.elf"], "-kernel /nonexistent.elf: No such file or directory"),
    (["-device", "e1000"], "'e1000' is not a valid device model name"),
    (["-machine", "memory-backend=nope"], "Memory backend 'nope' not found"),
    (["-object", "memory-backend-ram,id=r,size=16M", "-m", "32M", "-machine", "memory-backend=r"],
     "does not match the size"),
    (["-object", "memory-backend-file,id=f,size=16M,mem-path=/nonexistent/dir/ram",
      "-machine", "memory-backend=f"], "can't open backing store /nonexistent/dir/ram for guest RAM"),
    (["-object", "memory-backend-foo,id=x,size=1M"], "invalid object type: memory-backend-foo"),
    (["-serial", "bogus:x"], "-serial bogus:x"),
    (["-drive", "file=/nonexistent.img,format=raw"], "/nonexistent.img"),
    (["-drive", "file=x.img,format=qcow2"], "format 'qcow2' is not supported"),
    (["-d", "nosuchitem"], "unknown log item 'nosuchitem'"),
    (["-chardev", "socket,id=c"], "-chardev socket,id=c: socket needs 'path', or 'host' and 'port'"),
    (["-object", "tls-creds-x509,id=t,dir=/nonexistent,endpoint=server"],
     "Unable to access credentials /nonexistent/ca-cert.pem: No such file or directory"),
])
def test_bad_options_give_one_clear_line(args: list[str], needle: str) -> None:
    r = run_pyvm("-display", "none", *args, timeout=20)
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert needle in err, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_backend_file_too_small(tmp_path) -> None:
    f = tmp_path / "small"
    f.write_bytes(bytes(4096))
    r = run_pyvm("-object", f"memory-backend-file,id=f,size=16M,mem-path={f},share=on",
                 "-machine", "memory-backend=f", "-display", "none")
    assert r.returncode == 1
    assert "backing store size 0x1000 does not match 'size' option 0x1000000" in r.stderr.decode()


def test_help_and_version() -> None:
    r = run_pyvm("-h")
    assert r.returncode == 0 and b"-incoming" in r.stdout and b"-qmp" in r.stdout
    r = run_pyvm("-version")
    assert r.returncode == 0 and b"pyvm version" in r.stdout


def test_prelaunch_with_S_does_not_run(vms) -> None:
    vm = vms("vm", "-S", "-m", "16M")
    assert vm.status() == "prelaunch"
    regs = vm.hmp("info registers")
    assert vm.serial() == ""
    assert vm.hmp("info registers") == regs and vm.status() == "prelaunch"
    # the same process does run the guest once told to: its output was due to -S alone
    vm.cmd("cont")
    vm.wait_serial("pyvm hello: guest running")
