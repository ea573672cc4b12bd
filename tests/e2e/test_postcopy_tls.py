"""Postcopy over TLS between real pyvm processes: the return path (page requests, SHUT)
goes back through the same TLS session, with the test CA of the TLS tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import guest
from tests.vmproc import VmProcess
from tests.waiting import wait_until
from pyvm.userfault import unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason() is not None, reason=unavailable_reason() or "")

HOT = ["-m", "32M", "-kernel", guest("memcheck.elf"), "-append", "start=1 size=16",
       "-display", "none"]


def _gens(text: str) -> list[int]:
    return [int(line.split()[2]) for line in text.split("\r\n")[:-1]
            if line.startswith("memcheck gen ") and line.endswith(" ok")]


def _postcopy_over_tls(vms, pki, caps: list[str], creds: tuple[str, str] | None = None
                       ) -> tuple[VmProcess, VmProcess, dict]:
    """``creds``: the source's and destination's -object (default: x509 from ``pki``)."""
    capabilities = [{"capability": c, "state": True} for c in caps]
    src_obj, dst_obj = creds or (
        f"tls-creds-x509,id=tls0,dir={pki['client']},endpoint=client",
        f"tls-creds-x509,id=tls0,dir={pki['server']},endpoint=server,verify-peer=on")
    src = vms("src", *HOT, "-d", "migration", "-object", src_obj)
    src.wait_serial("memcheck gen 2 ok", timeout=60)
    dst = vms("dst", *HOT, "-incoming", "defer", "-object", dst_obj)
    for vm in (src, dst):
        vm.cmd("migrate-set-capabilities", capabilities=capabilities)
        vm.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    port = dst.cmd("query-migrate")["socket-address"][0]["port"]
    src.cmd("migrate-set-parameters", **{"tls-hostname": "localhost", "max-bandwidth": 4 << 20,
                                         "max-postcopy-bandwidth": 4 << 20})
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    wait_until(lambda: int(src.cmd("query-migrate").get("ram", {}).get("dirty-sync-count", 0)) >= 2,
               60, "two syncs")
    src.cmd("migrate-start-postcopy")
    done = src.wait_migration(("completed", "failed", "postcopy-paused"), timeout=90)
    assert done["status"] == "completed", (done, dst.cmd("query-migrate"), dst.stderr()[-2000:])
    assert dst.wait_migration(("completed", "failed", "postcopy-paused"))["status"] == "completed"
    # the requests came back over TLS and were answered
    assert done["ram"]["postcopy-requests"] > 0, done
    last_src = max(_gens(src.serial()))
    out = dst.wait_serial(" ok\r\n", count=2, timeout=60)
    assert "FAIL" not in out, out
    assert _gens(out)[0] == last_src + 1
    return src, dst, done


def test_postcopy_over_tls(vms, pki) -> None:
    """Also postcopy-blocktime (the plain postcopy run of make test): the destination
    reports how long its vCPU waited, in query-migrate and HMP, the source does not."""
    src, dst, done = _postcopy_over_tls(vms, pki, ["postcopy-ram", "postcopy-blocktime"])
    info = dst.cmd("query-migrate")
    total, per_vcpu = info["postcopy-blocktime"], info["postcopy-vcpu-blocktime"]
    assert len(per_vcpu) == 1 and 0 < total <= per_vcpu[0], info
    assert total <= done["total-time"], (info, done)
    text = dst.hmp("info migrate").replace("\r\n", "\n")
    assert f"\npostcopy blocktime: {total}\n" in text, text
    assert f"\npostcopy vcpu blocktime: {per_vcpu[0]}\n" in text, text
    assert "postcopy-blocktime" not in done


@pytest.mark.postcopy_full
def test_postcopy_preempt_over_tls(vms, pki) -> None:
    src, _, done = _postcopy_over_tls(vms, pki, ["postcopy-ram", "postcopy-preempt"])
    requests = done["ram"]["postcopy-requests"]
    assert (f"{requests} pages sent on the preempt channel") in src.stderr()


@pytest.mark.postcopy_full
def test_postcopy_over_psk(vms, pki, tmp_path: Path) -> None:
    """Pre-shared keys: the return path rides the TLS pump of tls-creds-psk."""
    key = "00112233445566778899aabbccddeeff" * 2
    dirs = []
    for side in ("client", "server"):
        d = tmp_path / side
        d.mkdir()
        (d / "keys.psk").write_text(f"qemu:{key}\n")
        (d / "keys.psk").chmod(0o600)
        dirs.append(f"tls-creds-psk,id=tls0,dir={d},endpoint={side}")
    _postcopy_over_tls(vms, pki, ["postcopy-ram"], (dirs[0], dirs[1]))
