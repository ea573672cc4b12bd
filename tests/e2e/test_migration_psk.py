"""Migration over TLS with pre-shared keys (``-object tls-creds-psk``), between real pyvm
processes: the guest's RAM arrives equal (main channel and multifd channels); a source
with a wrong key or an unknown username is refused while the destination stays in
``inmigrate``; QEMU's texts for a missing ``keys.psk`` or username
(crypto/tlscredspsk.c)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyvm.tls import TlsError, make_object
from tests.conftest import guest
from tests.vmproc import VmProcess
from tests.waiting import wait_until

RAM = 32 << 20
MEMCHECK = ["-m", "32M", "-kernel", guest("memcheck.elf"), "-append", "start=1 size=4",
            "-display", "none"]
KEY = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
OTHER_KEY = "fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210"


def _keys(d: Path, text: str) -> Path:
    d.mkdir()
    (d / "keys.psk").write_text(text)
    os.chmod(d / "keys.psk", 0o600)
    return d


@pytest.fixture
def dirs(tmp_path: Path) -> dict[str, Path]:
    return {
        "server": _keys(tmp_path / "server", f"alice:{OTHER_KEY}\nqemu:{KEY}\n"),
        "client": _keys(tmp_path / "client", f"qemu:{KEY}\n"),
        "wrongkey": _keys(tmp_path / "wrongkey", f"qemu:{OTHER_KEY}\n"),
        "stranger": _keys(tmp_path / "stranger", f"mallory:{KEY}\n"),
    }


def _destination(vms, d: Path, name: str = "dst", caps: dict | None = None) -> tuple[VmProcess, int]:
    dst = vms(name, *MEMCHECK, "-S", "-incoming", "defer",
              "-object", f"tls-creds-psk,id=tls0,dir={d},endpoint=server")
    if caps:
        dst.cmd("migrate-set-capabilities",
                capabilities=[{"capability": k, "state": v} for k, v in caps.items()])
    dst.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    return dst, int(dst.cmd("query-migrate")["socket-address"][0]["port"])


def _source(vms, d: Path, name: str = "src", username: str | None = None,
            caps: dict | None = None) -> VmProcess:
    obj = f"tls-creds-psk,id=tls0,dir={d},endpoint=client"
    if username:
        obj += f",username={username}"
    src = vms(name, *MEMCHECK, "-object", obj)
    src.wait_serial("memcheck gen 1 ok")
    if caps:
        src.cmd("migrate-set-capabilities",
                capabilities=[{"capability": k, "state": v} for k, v in caps.items()])
    src.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
    return src


def _ram_equal_migration(src: VmProcess, dst: VmProcess, port: int) -> None:
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    assert src.wait_migration()["status"] == "completed", src.cmd("query-migrate")
    assert dst.wait_migration(("completed", "failed"))["status"] == "completed"
    assert src.status() == "postmigrate" and dst.status() == "paused"
    # both guests are stopped now: their RAM must be byte for byte the same
    assert src.pmem(RAM) == dst.pmem(RAM)
    dst.cmd("cont")
    dst.wait_serial(" ok", count=dst.serial().count(" ok") + 1)
    assert "FAIL" not in dst.serial()


def test_psk_multifd_migration_carries_ram_equal(vms, dirs) -> None:
    caps = {"multifd": True}
    dst, port = _destination(vms, dirs["server"], caps=caps)
    _ram_equal_migration(_source(vms, dirs["client"], caps=caps), dst, port)


def test_psk_refuses_a_wrong_key_and_an_unknown_user_then_migrates(vms, dirs) -> None:
    dst, port = _destination(vms, dirs["server"])
    # one source holding three credentials; the tls-creds parameter picks one per attempt
    src = vms("src", *MEMCHECK,
              "-object", f"tls-creds-psk,id=wrongkey,dir={dirs['wrongkey']},endpoint=client",
              "-object", f"tls-creds-psk,id=stranger,dir={dirs['stranger']},endpoint=client,"
                         "username=mallory",
              "-object", f"tls-creds-psk,id=good,dir={dirs['client']},endpoint=client")
    src.wait_serial("memcheck gen 1 ok")
    for creds in ("wrongkey", "stranger"):
        src.cmd("migrate-set-parameters", **{"tls-creds": creds})
        src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
        info = src.wait_migration(("completed", "failed"))
        assert info["status"] == "failed", info
        assert info["error-desc"].startswith("TLS handshake failed"), info
        assert src.status() == "running"
        assert dst.status() == "inmigrate"
        assert dst.cmd("query-migrate").get("status") in (None, "setup", "none")
    wait_until(lambda: dst.stderr().count("TLS handshake failed") >= 2, 15,
               what="both refusals reported")
    assert "Username mallory not found in PSK file" in dst.stderr()
    # the destination still takes the right source, and the RAM arrives equal
    src.cmd("migrate-set-parameters", **{"tls-creds": "good"})
    _ram_equal_migration(src, dst, port)
    assert "Traceback" not in dst.stderr()


@pytest.mark.parametrize("props, text", [
    ("dir={tmp}/none,endpoint=client",
     "Unable to access credentials {tmp}/none/keys.psk: No such file or directory"),
    ("dir={tmp}/client,endpoint=client,username=bob",
     "Username bob not found in PSK file {tmp}/client/keys.psk"),
    ("dir={tmp}/server,endpoint=server,username=qemu",
     "username should not be set when endpoint=server"),
])
def test_psk_object_errors_give_qemus_texts(dirs, tmp_path: Path, props: str, text: str) -> None:
    # the command line's path to these (one line, exit 1) is tested in test_tls_objects.py
    value = props.format(tmp=tmp_path)
    with pytest.raises(TlsError) as err:
        make_object("tls-creds-psk",
                    {"id": "p", **dict(kv.split("=", 1) for kv in value.split(","))})
    assert str(err.value) == text.format(tmp=tmp_path)
