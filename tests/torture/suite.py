"""The standing adversarial suite: R1 streams, R2 monitor, R3 faults, R4 ping-pong, R5 files
and TLS.  ``make torture`` runs it at full size and prints the figures kept in
docs/reliability.md; ``tests/torture/test_torture.py`` runs every part at a small size in
the normal test suite (marker ``torture``).

Every part raises AssertionError on a finding and returns a dict of figures.  Network
faults stay on loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from pyvm.analyze import AnalyzerTarget, find_vmdesc
from pyvm.migration.stream.decoder import StreamDecoder
from pyvm.migration.errors import MigrationError
from tests.conftest import guest
from tests.torture import host_faults
from tests.torture.launcher import Launcher
from tests.stream_mutations import SplitStream, flip, mutations, split_stream
from tests.vmproc import QmpFailed, VmProcess
from tests.waiting import wait_stalled, wait_until

MEMCHECK = ["-m", "32M", "-kernel", guest("memcheck.elf"), "-append", "start=1 size=4",
            "-display", "none"]
# R1's streams: a smaller guest (1 MiB of data), so thousands of decodes stay quick
SMALL = ["-m", "4M", "-kernel", guest("memcheck.elf"), "-append", "start=1 size=1",
         "-display", "none"]
AB = ["-m", "32M", "-smp", "2", "-kernel", guest("ab.elf"), "-append", "start=1 size=8",
      "-display", "none"]


_launcher: Launcher | None = None


@contextlib.contextmanager
def launched() -> Iterator[Launcher]:
    """Within the block, the suite's VMs are forked from a pre-imported pyvm
    (tests/torture/launcher.py), which takes most of the start-up time off each one."""
    global _launcher
    launcher = Launcher()
    _launcher = launcher
    try:
        yield launcher
    finally:
        _launcher = None
        launcher.close()


def _vm(tmp: Path, name: str, *args: str) -> VmProcess:
    return VmProcess(tmp, name, *args, launcher=_launcher)


def _checksum(vm: VmProcess, on: bool = True) -> None:
    vm.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-checksum", "state": on}])


def _progress(vm: VmProcess, marker: str, timeout: float = 20) -> None:
    n = vm.serial().count(marker)
    deadline = time.monotonic() + timeout
    while vm.serial().count(marker) <= n:
        assert time.monotonic() < deadline, f"{vm.name}: no progress: {vm.serial()[-200:]!r}"
        time.sleep(0.05)
    assert "FAIL" not in vm.serial(), vm.serial()[-400:]


def saved_stream(tmp: Path, checksum: bool) -> bytes:
    """A real stream of a running memcheck guest."""
    path = tmp / f"real-{int(checksum)}.state"
    src = _vm(tmp, f"saver{int(checksum)}", *SMALL)
    try:
        src.wait_serial("memcheck gen 1 ok")
        if checksum:
            _checksum(src)
        src.cmd("migrate", uri=f"file:{path}")
        assert src.wait_migration()["status"] == "completed"
    finally:
        src.close()
    return path.read_bytes()


# -- R1: streams ---------------------------------------------------------------------------------

class _VmLikeTarget(AnalyzerTarget):
    """The analyzer's recorder with a VM's fixed configuration: the destination's
    capabilities and machine type, not the stream's."""

    def __init__(self, vmdesc: dict[str, Any], caps: list[str], machine: str) -> None:
        super().__init__(vmdesc, dump_memory=False, extract=False)
        self._caps = caps
        self._machine = machine

    def capabilities(self) -> list[str]:        # type: ignore[override]
        return self._caps

    def machine_type(self) -> str:              # type: ignore[override]
        return self._machine


def _decode(data: bytes, vmdesc: dict[str, Any], caps: list[str], machine: str,
            expected: list[tuple[str, int]]) -> tuple[str, Any]:
    target = _VmLikeTarget(vmdesc, caps, machine)
    try:
        dec = StreamDecoder(target, expected_sections=expected)
        for i in range(0, len(data), 1 << 20):
            dec.feed(data[i:i + (1 << 20)])
        dec.close()
        state = {k: v.values for k, v in target.loaders.items()}
        ram = {n: bytes(b.buffer) for n, b in target.blocks.items()}
        return "loaded", (state, ram)
    except MigrationError as err:
        text = "\n".join(err.report())
        assert all(line.isprintable() for line in err.report()), f"raw bytes in {text!r}"
        return "refused", None
    finally:
        target.close()


# The job the decoding workers read (set before they fork, so nothing is pickled to them).
_R1_JOB: dict[str, Any] = {}
R1_WORKERS = 2               # decoding processes for a large R1 (one per core of the machine)


def _decode_one(index: int) -> tuple[str, Any]:
    j = _R1_JOB
    outcome, loaded = _decode(j["muts"][index][1], j["vmdesc"], j["caps"], j["machine"],
                              j["expected"])
    return outcome, (loaded[0] if loaded is not None else None)


def _decode_all(count: int) -> list[tuple[str, Any]]:
    """Decode the first ``count`` mutations of ``_R1_JOB``: in this process for a small
    run, else on R1_WORKERS forked processes (the decoder is CPU-bound Python)."""
    if count < 1000:
        return [_decode_one(i) for i in range(count)]
    import concurrent.futures
    import multiprocessing
    with concurrent.futures.ProcessPoolExecutor(
            R1_WORKERS, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_decode_one, range(count), chunksize=25))


def _baseline(data: bytes, checksum: bool) -> tuple[SplitStream, dict[str, Any], list[str], str,
                                                     list[tuple[str, int]], Any]:
    """What every mutation of ``data`` is judged against: its sections, vmdesc,
    capabilities, machine type, the device sections it must carry, and the device state
    the unmutated stream loads."""
    split = split_stream(data)
    vmdesc = find_vmdesc(data)
    caps = ["x-checksum"] if checksum else []
    expected = sorted({(s.idstr, s.instance_id) for s in split.sections if s.opens})
    machine = data[13:13 + int.from_bytes(data[9:13], "big")].decode()
    outcome, loaded = _decode(data, vmdesc, caps, machine, expected)
    assert outcome == "loaded" and loaded is not None
    return split, vmdesc, caps, machine, expected, loaded[0]


def r1_streams(tmp: Path, in_process: int, processes: int, seed: int = 16) -> dict[str, Any]:
    """Mutations of real streams into the decoder in-process and into real -incoming VMs."""
    rng = random.Random(seed)
    figures: dict[str, Any] = {}
    for checksum in (False, True):
        data = saved_stream(tmp, checksum)
        split, vmdesc, caps, machine, expected, base_state = _baseline(data, checksum)
        counts = {"mutations": 0, "refused": 0, "loaded_page_data_only": 0,
                  "loaded_device_state_changed": 0}
        per_round = max(1, in_process // 2)
        muts = list(mutations(split, rng, random_count=max(1, per_round // 4)))
        rng.shuffle(muts)
        _R1_JOB.update(muts=muts, vmdesc=vmdesc, caps=caps, machine=machine, expected=expected)
        try:
            results = _decode_all(per_round)
        finally:
            _R1_JOB.clear()
        for (label, _bad), (outcome, state) in zip(muts[:per_round], results):
            counts["mutations"] += 1
            if outcome == "refused":
                counts["refused"] += 1
            elif state == base_state:
                counts["loaded_page_data_only"] += 1
            else:
                counts["loaded_device_state_changed"] += 1
                assert not checksum, f"{label} loaded with x-checksum on"
                assert label.startswith(("flip bit", "garbage", "huge length")), \
                    f"structural mutation {label} loaded"
            if checksum:
                assert outcome == "refused", f"{label} loaded with x-checksum on"
        figures[f"in_process_checksum_{'on' if checksum else 'off'}"] = counts
        figures[f"real_processes_checksum_{'on' if checksum else 'off'}"] = \
            _r1_processes(tmp, split, muts[per_round:per_round + processes], checksum)
    return figures


def r1_hypothesis(tmp: Path, examples: int, seed: int = 16) -> dict[str, Any]:
    """Property-based fuzzing of the decoder in-process (hypothesis): one to three edits
    (bit flips, cuts, garbage splices, huge lengths, dropped/duplicated/swapped sections)
    of a real stream.  Every input must end in a clean refusal or a load; a load that
    changed device state must come from value edits alone (never a cut or a section
    edit); with ``x-checksum`` on no edited stream may load."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    figures: dict[str, Any] = {}
    for checksum in (False, True):
        data = saved_stream(tmp, checksum)
        split, vmdesc, caps, machine, expected, base_state = _baseline(data, checksum)
        lo, hi = split.prefix_end, split.tail_start
        opens = [i for i, sec in enumerate(split.sections) if sec.opens]
        edit = st.one_of(
            st.tuples(st.just("flip"), st.integers(lo, hi - 1), st.integers(0, 7)),
            st.tuples(st.just("cut"), st.integers(0, hi - 1), st.just(0)),
            st.tuples(st.just("garbage"), st.integers(lo, hi - 1), st.binary(min_size=1, max_size=64)),
            st.tuples(st.just("huge"), st.integers(lo, hi - 4), st.just(0)),
            st.tuples(st.just("drop"), st.sampled_from(opens), st.just(0)),
            st.tuples(st.just("duplicate"), st.sampled_from(opens), st.just(0)),
            st.tuples(st.just("swap"), st.sampled_from(opens[:-1]), st.just(0)),
        )
        counts = {"examples": 0, "refused": 0, "loaded_page_data_only": 0,
                  "loaded_device_state_changed": 0}

        def apply(edits: list[tuple[str, int, Any]]) -> bytes | None:
            """The edited stream; section edits come first (each on the layout the
            previous one left), then byte edits; None when an edit does not apply."""
            out = data
            ordered = sorted(edits, key=lambda e: e[0] not in ("drop", "duplicate", "swap"))
            for kind, at, arg in ordered:
                if kind in ("drop", "duplicate", "swap"):
                    try:
                        cur = split_stream(out) if out is not data else split
                    except Exception:  # noqa: BLE001 - an earlier edit broke the layout
                        return None
                    if at >= len(cur.sections) - (kind == "swap"):
                        return None
                    out = (cur.without(at) if kind == "drop" else cur.duplicated(at)
                           if kind == "duplicate" else cur.swapped(at, at + 1))
                elif at >= len(out) - (3 if kind == "huge" else 0):
                    return None
                elif kind == "flip":
                    out = flip(out, at, arg)
                elif kind == "cut":
                    out = out[:at]
                elif kind == "garbage":
                    out = out[:at] + arg + out[at + len(arg):]
                else:
                    out = out[:at] + b"\xff\xff\xff\xf0" + out[at + 4:]
            return out

        @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(st.lists(edit, min_size=1, max_size=3))
        def prop(edits: list[tuple[str, int, Any]]) -> None:
            bad = apply(edits)
            if bad is None or bad == data:
                return
            counts["examples"] += 1
            outcome, loaded = _decode(bad, vmdesc, caps, machine, expected)
            if outcome == "refused":
                counts["refused"] += 1
                return
            assert not checksum, f"{edits} loaded with x-checksum on"
            if loaded[0] == base_state:
                counts["loaded_page_data_only"] += 1
            else:
                counts["loaded_device_state_changed"] += 1
                assert all(k in ("flip", "garbage", "huge") for k, _, _ in edits), \
                    f"structural edit {edits} loaded with device state changed"

        prop()
        figures[f"checksum_{'on' if checksum else 'off'}"] = counts
    return figures


def _r1_processes(tmp: Path, split: SplitStream, muts: list[tuple[str, bytes]],
                  checksum: bool) -> dict[str, int]:
    counts = {"streams": 0, "refused": 0, "loaded": 0}
    bad_path = tmp / "bad.state"
    for i, (label, bad) in enumerate(muts):
        bad_path.write_bytes(bad)
        counts["streams"] += 1
        dst = _vm(tmp, f"r1-{i}", *SMALL, "-S", "-incoming", "defer")
        try:
            if checksum:
                _checksum(dst)
            dst.cmd("migrate-incoming", uri=f"file:{bad_path}", **{"exit-on-error": False})
            info = dst.wait_migration(("completed", "failed"), timeout=60)
            assert "Traceback" not in dst.stderr(), dst.stderr()
            if info["status"] == "failed":
                counts["refused"] += 1
                assert dst.status() == "inmigrate"
                assert info["error-desc"].isprintable()
            else:
                counts["loaded"] += 1
                assert not checksum, f"{label} loaded into a VM with x-checksum on"
        finally:
            dst.close()
    return counts


# -- R2: the monitor ------------------------------------------------------------------------------

_SAFE_HMP = ["xp /{n}{f} {a}", "x /{n}{f} {a}", "p {e}", "p /{f} {e}", "info status",
             "info registers", "info mtree", "info cpus", "info chardev", "help", "help xp",
             "info migrate", "info {w}", "{w} {w}", "xp", "p", "x /{n}i {a}"]
_UNSAFE = {"quit", "q", "stop", "s", "cont", "c", "system_reset", "system_powerdown", "migrate",
           "migrate-incoming", "memsave", "pmemsave", "migrate_cancel", "migrate-set-capabilities",
           "migrate-set-parameters", "cpu", "migrate_incoming", "migrate_set_capability",
           "migrate_set_parameter", "migrate-continue", "x-exit-preconfig", "screendump"}


def _expr(rng: random.Random, depth: int = 0) -> str:
    c = rng.randrange(7)
    if depth > 70 or c == 0:
        return rng.choice(["0", "1", "0x10", "077", "'a'", "$eax", "$pc", "18446744073709551615",
                           "99999999999999999999999", "$nope", "'"])
    if c == 1:
        return "(" + _expr(rng, depth + 1) + ")"
    if c == 2:
        return rng.choice("-~+") + _expr(rng, depth + 1)
    if c == 3:
        return "(" * 80 + "1" + ")" * 80
    if depth > 8:                        # binary operators double the size: keep it bounded
        return _expr(rng, depth + 1)
    return _expr(rng, depth + 1) + rng.choice(" + - * / % & | ^ ".split(" ")) + _expr(rng, depth + 1)


def _hostile(rng: random.Random, commands: list[str]) -> bytes:
    k = rng.randrange(12)
    if k == 0:
        return rng.randbytes(rng.randrange(1, 200)).replace(b"\n", b" ") + b"\n"
    if k == 1:
        d = rng.randrange(1, 3000)
        return (b"[" * d + b"]" * d) + b"\n"
    if k == 2:
        return b'{"execute": "' + b"x" * rng.randrange(1, 100000) + b'"}\n'
    if k == 3:
        return rng.choice([b"{", b"}", b"{'execute': 'query-status'}", b"1e400", b'"\\ud800"',
                           b"\xff\xfe{", b'{"execute": "query-status", "id": [[[[1]]]]}']) + b"\n"
    if k == 4:
        fmt = rng.choice(_SAFE_HMP)
        line = fmt.format(n=rng.choice([1, 7, 64, 128, 129, 4096, 4097, 4000000, 0, 99999999999]),
                          f=rng.choice(["x", "xb", "d", "uh", "ow", "cg", "i", "c", "q", "xL", ""]),
                          a=rng.choice(["0", "0x100000", "-1", "0xfffffffffffff000", "$pc"]),
                          e=_expr(rng), w=rng.choice(["foo", "\x1b[2J", "info", "%s%n", "é"]))
        return json.dumps({"execute": "human-monitor-command",
                           "arguments": {"command-line": line}}).encode() + b"\n"
    name = rng.choice(commands + ["nope", "", "query-" + "z" * 300])
    args: Any = rng.choice([{}, {"x": 1}, [], None, {"filename": 7}, {"val": -1, "size": 1 << 62},
                            {"command-line": None}, {"capabilities": [{"capability": "x"}]}])
    msg: dict[str, Any] = {"execute": name, "id": rng.randrange(1 << 31)}
    if args is not None:
        msg["arguments"] = args
    return json.dumps(msg).encode() + b"\n"


def _qmp_client(path: str) -> tuple[socket.socket, Any]:
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    f = s.makefile("rb")
    f.readline()
    s.sendall(b'{"execute": "qmp_capabilities"}\n')
    f.readline()
    return s, f


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class _TlsMonitor:
    """R2 over TLS: a second monitor on a TLS tcp socket (x509, verify-peer=on, authz),
    the certificates made for the run (tests/pki.py)."""

    def __init__(self, tmp: Path) -> None:
        from tests.pki import CLIENT_DN, make_pki
        (tmp / "r2-pki").mkdir(exist_ok=True)
        self.pki = make_pki(tmp / "r2-pki")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        dn = CLIENT_DN.replace(",", ",,")
        self.args = [
            "-object", f"tls-creds-x509,id=tls0,dir={self.pki['server']},endpoint=server,"
                       "verify-peer=on",
            "-object", f"authz-simple,id=auth0,identity={dn}",
            "-chardev", f"socket,id=tlsmon,host=127.0.0.1,port={self.port},server=on,"
                        "wait=off,tls-creds=tls0,tls-authz=auth0",
            "-mon", "chardev=tlsmon,mode=control"]

    def context(self, creds: str = "client") -> Any:
        import ssl
        ctx = ssl.create_default_context(cafile=str(self.pki[creds] / "ca-cert.pem"))
        if (self.pki[creds] / "client-cert.pem").exists():
            ctx.load_cert_chain(str(self.pki[creds] / "client-cert.pem"),
                                str(self.pki[creds] / "client-key.pem"))
        return ctx

    def client(self) -> tuple[socket.socket, Any]:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=60)
        s = self.context().wrap_socket(raw, server_hostname="127.0.0.1")
        f = s.makefile("rb")
        f.readline()
        s.sendall(b'{"execute": "qmp_capabilities"}\n')
        f.readline()
        return s, f

    def intruders(self, rng: random.Random, count: int) -> int:
        """Clients the TLS monitor must drop: plain JSON, random bytes, a client without a
        certificate, one from another CA, one the authz object denies, a handshake cut
        off half-way.  Returns how many were dropped without a greeting."""
        import ssl
        dropped = 0
        for n in range(count):
            kind = n % 6
            try:
                raw = socket.create_connection(("127.0.0.1", self.port), timeout=30)
            except OSError:
                continue
            with raw:
                try:
                    if kind == 0:
                        raw.sendall(b'{"execute": "qmp_capabilities"}\n')
                    elif kind == 1:
                        raw.sendall(rng.randbytes(rng.randrange(1, 4000)))
                    elif kind == 5:
                        raw.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
                        raw.shutdown(socket.SHUT_WR)
                    if kind in (0, 1, 5):
                        data = b""
                        while chunk := raw.recv(4096):
                            data += chunk
                        assert b"QMP" not in data, data[:200]
                        dropped += 1
                        continue
                    creds = {2: "nocert", 3: "rogue", 4: "other"}[kind]
                    with self.context(creds).wrap_socket(raw, server_hostname="127.0.0.1") as s:
                        s.sendall(b'{"execute": "qmp_capabilities"}\n')
                        data = b""
                        while chunk := s.recv(4096):
                            data += chunk
                        assert b"QMP" not in data, data[:200]
                        dropped += 1
                except (ssl.SSLError, ConnectionError):
                    dropped += 1
        return dropped


def r2_monitor(tmp: Path, messages: int, clients: int = 4, seed: int = 2,
               tls: bool = False) -> dict[str, Any]:
    """Hostile QMP/HMP messages from concurrent clients (one a slow reader); with ``tls``
    they speak TLS to a TLS monitor, and intruders without the right certificate or
    speaking no TLS at all come and are dropped meanwhile."""
    import ssl
    tls_mon = _TlsMonitor(tmp) if tls else None
    vm = VmProcess(tmp, "r2tls" if tls else "r2", *MEMCHECK, *(tls_mon.args if tls_mon else []),
                   connect_timeout=60)
    intruders = [0]
    try:
        vm.wait_serial("memcheck gen 1 ok")
        commands = [c["name"] for c in vm.cmd("query-commands") if c["name"] not in _UNSAFE]
        rss_before = _rss_kib(vm.proc.pid)
        sent = [0] * clients
        errors: list[str] = []
        per_client = messages // clients

        def client(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            try:
                s, f = tls_mon.client() if tls_mon else _qmp_client(vm.sock)
                s.settimeout(60)
                slow = i == clients - 1          # a slow reader: reads in bursts
                for n in range(per_client):
                    s.sendall(_hostile(rng, commands))
                    sent[i] += 1
                    if not slow or n % 50 == 49:
                        # drain what has arrived without waiting for every reply
                        s.setblocking(False)
                        try:
                            while s.recv(1 << 20):
                                pass
                        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError):
                            pass
                        s.setblocking(True)
                        s.settimeout(60)
                    if slow and n % 50 == 49:
                        time.sleep(0.05)
                s.close()
            except OSError as err:               # dropped for not reading is allowed
                if not (i == clients - 1 and isinstance(
                        err, (BrokenPipeError, ConnectionResetError, ssl.SSLEOFError))):
                    errors.append(f"client {i}: {err!r}")

        def intruder() -> None:
            assert tls_mon is not None
            try:
                intruders[0] = tls_mon.intruders(random.Random(seed), max(6, messages // 100))
            except (OSError, AssertionError) as err:
                errors.append(f"intruder: {err!r}")
        start = time.monotonic()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        if tls_mon is not None:
            threads.append(threading.Thread(target=intruder))
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        elapsed = time.monotonic() - start
        assert not errors, errors
        assert vm.proc.poll() is None, vm.stderr()
        t0 = time.monotonic()
        assert vm.status() == "running"
        latency = time.monotonic() - t0
        _progress(vm, " ok")
        rss_after = _rss_kib(vm.proc.pid)
        assert "Traceback" not in vm.stderr(), vm.stderr()[-2000:]
        assert rss_after - rss_before < 200 << 10, (rss_before, rss_after)
        figures = {"messages": sum(sent), "clients": clients, "seconds": round(elapsed, 1),
                   "rss_growth_mib": round((rss_after - rss_before) / 1024, 1),
                   "query_status_after_s": round(latency, 3)}
        if tls_mon is not None:
            figures["intruders_dropped"] = intruders[0]
            s, f = tls_mon.client()                  # the right client still gets in
            with s:
                s.sendall(b'{"execute": "query-status"}\n')
                assert json.loads(f.readline())["return"]["status"] == "running"
        return figures
    finally:
        vm.close()


# -- R3: faults per transport ---------------------------------------------------------------------

# R3's sources dirty 16 MiB: more than every buffer between pyvm and a peer that never reads
BIG = ["-m", "32M", "-kernel", guest("memcheck.elf"), "-append", "start=1 size=16",
       "-display", "none"]


def _source(tmp: Path, name: str) -> VmProcess:
    src = _vm(tmp, name, *BIG)
    src.wait_serial("memcheck gen 1 ok")
    return src


def _resumes_and_migrates_again(src: VmProcess, tmp: Path) -> None:
    info = src.cmd("query-migrate")
    assert info["status"] in ("failed", "cancelled"), info
    assert src.status() == "running"
    _progress(src, " ok")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    src.cmd("migrate-set-capabilities",
            capabilities=[{"capability": "pause-before-switchover", "state": False}])
    src.cmd("migrate", uri=f"file:{tmp / 'again.state'}")
    assert src.wait_migration()["status"] == "completed"


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(x) for x in text]
    return out


def r3_faults(tmp: Path, quick: bool = False, only: set[str] | None = None) -> dict[str, Any]:
    """Faults on every transport; ``quick`` runs one of each kind (make test), ``only``
    the scenarios named.  The host-level faults (a veth link brought down inside a network
    namespace, a full tmpfs) need root; without it they are reported as skipped, with why."""
    results: dict[str, str] = {}
    host_reason = host_faults.unavailable()
    quick_set = {"destination killed/tcp", "exec helper killed", "cancel in setup/fifo without reader",
                 "cancel while active/unix peer not reading"}

    def scenario(name: str, fn: Callable[[VmProcess], None], host: bool = False) -> None:
        if (quick and name not in quick_set) or (only is not None and name not in only):
            return
        if host and host_reason is not None:
            results[name] = f"skipped: {host_reason}"
            return
        src = _source(tmp, f"r3-{len(results)}")          # unix socket paths are short
        try:
            fn(src)
            _resumes_and_migrates_again(src, tmp)
            results[name] = "ok"
        finally:
            src.close()

    def kill_destination(kind: str) -> Callable[[VmProcess], None]:
        def run(src: VmProcess) -> None:
            uri = "tcp:127.0.0.1:0" if kind == "tcp" else f"unix:{tmp / 'r3.sock'}"
            dst = _vm(tmp, "r3-dst", *MEMCHECK, "-incoming", uri)
            try:
                if kind == "tcp":
                    uri = f"tcp:127.0.0.1:{dst.cmd('query-migrate')['socket-address'][0]['port']}"
                src.cmd("migrate-set-parameters", **{"max-bandwidth": 2 << 20})
                src.cmd("migrate", uri=uri)
                src.wait_migration(("active",))
                wait_until(lambda: src.cmd("query-migrate")["ram"]["transferred"] > 0,
                           what="pages on the wire before the destination dies")
                dst.proc.kill()
                assert src.wait_migration()["status"] == "failed"
            finally:
                dst.close()
        return run

    def kill_exec_helper(src: VmProcess) -> None:
        src.cmd("migrate-set-parameters", **{"max-bandwidth": 2 << 20})
        src.cmd("migrate", uri="exec:cat > /dev/null")
        src.wait_migration(("active",))
        deadline = time.monotonic() + 5
        while not (kids := _children(src.proc.pid)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # the helper is ``sh -c``, which forks ``cat``: both hold the pipe, both die
        family = list(kids)
        for k in family:
            family += _children(k)
        for k in family:
            os.kill(k, 9)
        assert src.wait_migration()["status"] == "failed"

    def disk_full(src: VmProcess) -> None:
        src.cmd("migrate", uri="file:/dev/full")
        assert src.wait_migration()["status"] == "failed"

    def cancel_in(state: str, uri_kind: str) -> Callable[[VmProcess], None]:
        def run(src: VmProcess) -> None:
            keep: list[Any] = []
            if uri_kind == "fifo":
                fifo = tmp / f"r3-{state}.fifo"
                if fifo.exists():
                    fifo.unlink()
                os.mkfifo(fifo)
                uri = f"file:{fifo}"
                if state == "active":
                    keep.append(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
            elif uri_kind in ("tcp", "unix"):
                if uri_kind == "tcp":
                    lsock = socket.create_server(("127.0.0.1", 0))
                    uri = f"tcp:127.0.0.1:{lsock.getsockname()[1]}"
                else:
                    path = tmp / f"r3-{state}.sock"
                    if path.exists():
                        path.unlink()
                    lsock = socket.socket(socket.AF_UNIX)
                    lsock.bind(str(path))
                    lsock.listen()
                    uri = f"unix:{path}"
                lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                keep.append(lsock)
                threading.Thread(target=lambda: keep.append(lsock.accept()[0]), daemon=True).start()
            elif uri_kind == "exec":
                uri = "exec:sleep 30"
            else:
                uri = f"file:{tmp / 'r3-slow.state'}"
            if state == "pre-switchover":
                src.cmd("migrate-set-capabilities",
                        capabilities=[{"capability": "pause-before-switchover", "state": True}])
            src.cmd("migrate", uri=uri)
            if state != "setup":
                src.wait_migration((state,), timeout=20)
            if state == "active":       # cancel once the writes are blocked (or done)
                wait_stalled(lambda: src.cmd("query-migrate").get("ram", {}).get("transferred"),
                             what="a migration into a slow peer", interval=0.2)
            t0 = time.monotonic()
            src.cmd("migrate_cancel")
            assert src.wait_migration(("cancelled",), timeout=5, poll=0.01)["status"] == "cancelled"
            assert time.monotonic() - t0 < 1.0
            for k in keep:
                if isinstance(k, int):
                    os.close(k)
                else:
                    k.close()
        return run

    def link_down(src: VmProcess) -> None:
        with host_faults.veth_namespace() as ns:
            dst = VmProcess(tmp, "r3-ns", *MEMCHECK, "-incoming", f"tcp:{ns.inside}:0",
                            prefix=ns.prefix)
            try:
                port = dst.cmd("query-migrate")["socket-address"][0]["port"]
                src.cmd("migrate-set-parameters", **{"max-bandwidth": 2 << 20})
                src.cmd("migrate", uri=f"tcp:{ns.inside}:{port}")
                src.wait_migration(("active",))
                wait_until(lambda: src.cmd("query-migrate")["ram"]["transferred"] > 0,
                           what="pages on the wire before the link goes down")
                ns.link_down()
                wait_stalled(lambda: src.cmd("query-migrate")["ram"]["transferred"],
                             what="a migration over a link that is down", interval=0.5)
                assert src.cmd("query-migrate")["status"] == "active"
                t0 = time.monotonic()
                src.cmd("migrate_cancel")
                assert src.wait_migration(("cancelled",), timeout=5, poll=0.01)["status"] == "cancelled"
                assert time.monotonic() - t0 < 1.0
            finally:
                dst.close()

    def tmpfs_full(src: VmProcess) -> None:
        with host_faults.small_tmpfs(tmp, "4m") as mnt:
            src.cmd("migrate", uri=f"file:{mnt / 'full.state'}")
            info = src.wait_migration()
            assert info["status"] == "failed", info
            assert "No space left on device" in info.get("error-desc", ""), info

    scenario("destination killed/tcp", kill_destination("tcp"))
    scenario("destination killed/unix", kill_destination("unix"))
    scenario("exec helper killed", kill_exec_helper)
    scenario("disk full (/dev/full)", disk_full)
    scenario("cancel in setup/fifo without reader", cancel_in("setup", "fifo"))
    for kind in ("fifo", "tcp", "unix", "exec"):
        scenario(f"cancel while active/{kind} peer not reading", cancel_in("active", kind))
    scenario("cancel in pre-switchover/file", cancel_in("pre-switchover", "file"))
    scenario("link down inside a network namespace/tcp, then cancel", link_down, host=True)
    scenario("disk full (4 MiB tmpfs)/file", tmpfs_full, host=True)
    return {"scenarios": len(results), "passed": sum(v == "ok" for v in results.values()),
            "skipped": {k: v for k, v in results.items() if v != "ok"},
            "list": sorted(results)}


# -- R4: ping-pong ---------------------------------------------------------------------------------

def r4_pingpong(tmp: Path, hops: int, check_every: int = 10) -> dict[str, Any]:
    """Live migrations hop after hop (each destination becomes the next source); the next
    destination is started while the current hop runs.  The guests check their own memory
    (memcheck prints FAIL, ab's vCPUs check each other's stores).  The memcheck chain and
    the ab chain run at the same time, each on its own thread."""
    figures: dict[str, Any] = {}
    errors: list[BaseException] = []

    def chain(label: str, args: list[str], marker: str) -> None:
        try:
            figures[label] = _r4_chain(tmp, label, args, marker, hops // 2, check_every)
        except BaseException as err:  # noqa: B902 - re-raised by the caller below
            errors.append(err)

    threads = [threading.Thread(target=chain, args=spec, name=f"r4-{spec[0]}")
               for spec in (("memcheck", MEMCHECK, " ok"), ("ab", AB, "B"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return figures


def _r4_chain(tmp: Path, label: str, args: list[str], marker: str, n: int,
              check_every: int) -> dict[str, Any]:
    src = _vm(tmp, f"r4-{label}-0", *args)
    downtimes = []
    start = time.monotonic()
    nxt: VmProcess | None = _vm(tmp, f"r4-{label}-1", *args, "-incoming", "tcp:127.0.0.1:0")
    try:
        src.wait_serial(marker.strip())
        for hop in range(1, n + 1):
            assert nxt is not None
            dst, nxt = nxt, None
            try:
                port = dst.cmd("query-migrate")["socket-address"][0]["port"]
                src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
                if hop < n:
                    nxt = _vm(tmp, f"r4-{label}-{(hop + 1) % 3}", *args,
                              "-incoming", "tcp:127.0.0.1:0")
                info = src.wait_migration(poll=0.02)
                assert info["status"] == "completed", info
                assert dst.wait_migration(("completed", "failed"), poll=0.02)["status"] == "completed"
                downtimes.append(info.get("downtime", 0))
                assert "FAIL" not in src.serial(), f"{label} hop {hop}: {src.serial()[-400:]!r}"
            except BaseException:
                dst.close()
                raise
            src.close()
            src = dst
            if hop % check_every == 0 or hop == n:
                _progress(src, marker)
    finally:
        src.close()
        if nxt is not None:
            nxt.close()
    downtimes.sort()
    return {"migrations": n, "seconds": round(time.monotonic() - start, 1),
            "downtime_ms_median": downtimes[len(downtimes) // 2] if downtimes else 0,
            "downtime_ms_max": downtimes[-1] if downtimes else 0}


def r4_linux(tmp: Path, hops: int) -> dict[str, Any]:
    """Live migrations of Debian's Linux guest (tests/linux.py) hop after hop, at the shell
    prompt: a shell variable set before the first hop must survive every hop, and the
    shell must answer after each one."""
    from tests.linux import BOOT_TIMEOUT, PROMPT, SerialConsole, linux_guest

    try:
        kernel, initrd = linux_guest.fetch(linux_guest.DEFAULT_DIR)
    except SystemExit as err:
        return {"skipped": f"Debian's kernel/busybox could not be fetched: {err}"}
    args = ["-m", "512M", "-kernel", str(kernel), "-initrd", str(initrd), "-append",
            linux_guest.CMDLINE, "-display", "none"]

    def start(name: str, *extra: str) -> tuple[VmProcess, SerialConsole]:
        sock = tmp / f"{name}.con"
        if sock.exists():
            sock.unlink()
        vm = VmProcess(tmp, name, *args, *extra, "-serial", f"unix:{sock},server=on,wait=off",
                       serial=False, connect_timeout=120, launcher=_launcher)
        try:
            return vm, SerialConsole(sock)
        except BaseException:
            vm.close()
            raise

    start_time = time.monotonic()
    src, con = start("r4l-0")
    downtimes = []
    try:
        con.expect(PROMPT, BOOT_TIMEOUT)
        booted = time.monotonic() - start_time
        con.run("X=4242; echo set-$X", "set-4242")
        for hop in range(1, hops + 1):
            dst, dcon = start(f"r4l-{hop % 3}", "-incoming", "tcp:127.0.0.1:0")
            try:
                port = dst.cmd("query-migrate")["socket-address"][0]["port"]
                src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
                info = src.wait_migration(timeout=300)
                assert info["status"] == "completed", info
                assert dst.wait_migration(("completed", "failed"), timeout=60)["status"] == "completed"
                downtimes.append(info.get("downtime", 0))
            except BaseException:
                dcon.close()
                dst.close()
                raise
            con.close()
            src.close()
            src, con = dst, dcon
            con.run(f"echo hop-$((X+{hop}))", f"hop-{4242 + hop}")
    finally:
        con.close()
        src.close()
    downtimes.sort()
    return {"migrations": hops, "boot_seconds": round(booted, 1),
            "seconds": round(time.monotonic() - start_time, 1),
            "downtime_ms_median": downtimes[len(downtimes) // 2] if downtimes else 0,
            "downtime_ms_max": downtimes[-1] if downtimes else 0}


# -- R5: files and TLS ----------------------------------------------------------------------------

def r5_private_and_tls(tmp: Path) -> dict[str, Any]:
    from tests.pki import make_pki
    old = os.umask(0o022)
    try:
        src = VmProcess(tmp, "r5", *MEMCHECK, "-d", "guest_errors", "-D", str(tmp / "r5.log"))
    finally:
        os.umask(old)
    checked = {}
    try:
        src.wait_serial("memcheck gen 1 ok")
        src.cmd("pmemsave", val=0, size=4096, filename=str(tmp / "r5-p.bin"))
        src.cmd("memsave", val=0, size=4096, filename=str(tmp / "r5-v.bin"))
        src.cmd("migrate", uri=f"file:{tmp / 'r5.state'}")
        assert src.wait_migration()["status"] == "completed"
        for p in (src.serial_path, tmp / "r5-p.bin", tmp / "r5-v.bin", tmp / "r5.state",
                  tmp / "r5.log", Path(src.sock)):
            mode = stat.S_IMODE(os.stat(p).st_mode)
            checked[p.name] = oct(mode)
            assert mode & 0o077 == 0, f"{p} is {oct(mode)}"
    finally:
        src.close()
    old = os.umask(0o022)
    try:
        dst = VmProcess(tmp, "r5-dst", *MEMCHECK, "-incoming", f"unix:{tmp / 'r5-mig.sock'}")
    finally:
        os.umask(old)
    try:
        mode = stat.S_IMODE(os.stat(tmp / "r5-mig.sock").st_mode)
        checked["migration unix socket"] = oct(mode)
        assert mode & 0o077 == 0
    finally:
        dst.close()
    pki = make_pki(Path(tempfile.mkdtemp(dir=tmp, prefix="pki")))
    refused = 0
    dst = VmProcess(tmp, "r5-tls", *MEMCHECK, "-S", "-incoming", "defer", "-object",
                    f"tls-creds-x509,id=t,dir={pki['server']},endpoint=server,verify-peer=on")
    try:
        dst.cmd("migrate-set-parameters", **{"tls-creds": "t"})
        dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
        port = dst.cmd("query-migrate")["socket-address"][0]["port"]
        for creds in ("nocert", "rogue"):
            src = VmProcess(tmp, f"r5-{creds}", *MEMCHECK, "-object",
                            f"tls-creds-x509,id=t,dir={pki[creds]},endpoint=client")
            try:
                src.cmd("migrate-set-parameters", **{"tls-creds": "t", "tls-hostname": "localhost"})
                src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
                assert src.wait_migration()["status"] == "failed"
                refused += 1
            finally:
                src.close()
        assert dst.status() == "inmigrate"
    finally:
        dst.close()
    return {"private_files": checked, "tls_clients_refused": refused}


# -- the command ------------------------------------------------------------------------------------

FULL = {"r1_in_process": 5000, "r1_processes": 40, "r1_hypothesis": 500, "r2_messages": 11000, "r2_tls_messages": 4000, "r4_hops": 200,
        "r4_linux_hops": 10}
QUICK = {"r1_in_process": 120, "r1_processes": 2, "r1_hypothesis": 40, "r2_messages": 600, "r2_tls_messages": 120, "r4_hops": 4,
         "r4_linux_hops": 1}


def run(sizes: dict[str, int], parts: list[str], tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in parts:
        start = time.monotonic()
        if part == "r1":
            out[part] = r1_streams(tmp, sizes["r1_in_process"], sizes["r1_processes"] // 2)
        elif part == "r1h":
            out[part] = r1_hypothesis(tmp, sizes["r1_hypothesis"])
        elif part == "r2":
            out[part] = r2_monitor(tmp, sizes["r2_messages"])
        elif part == "r2tls":
            out[part] = r2_monitor(tmp, sizes["r2_tls_messages"], tls=True)
        elif part == "r3":
            out[part] = r3_faults(tmp, quick=sizes is QUICK)
        elif part == "r4":
            out[part] = r4_pingpong(tmp, sizes["r4_hops"])
        elif part == "r4l":
            out[part] = r4_linux(tmp, sizes["r4_linux_hops"])
        elif part == "r5":
            out[part] = r5_private_and_tls(tmp)
        out[part]["wall_seconds"] = round(time.monotonic() - start, 1)
        print(f"{part}: {json.dumps(out[part])}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="pyvm's standing adversarial suite")
    p.add_argument("--quick", action="store_true", help="the small sizes of make test")
    p.add_argument("parts", nargs="*", default=["r1", "r1h", "r2", "r2tls", "r3", "r4", "r5"],
                   help="r1 r1h r2 r2tls r3 r4 r5 (the default), r4l: R4 with the Linux guest "
                        "(make torture-linux)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pyvm-torture-") as d, launched():
        start = time.monotonic()
        run(QUICK if args.quick else FULL, args.parts, Path(d))
        print(f"total: {time.monotonic() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
