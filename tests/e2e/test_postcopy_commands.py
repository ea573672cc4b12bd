"""The postcopy commands on a real pyvm process: QEMU's texts outside postcopy (QMP and HMP)."""

from __future__ import annotations

import pytest

from tests.conftest import guest
from tests.vmproc import QmpFailed

MEMCHECK = ["-m", "32M", "-kernel", guest("memcheck.elf"), "-append", "start=1 size=4",
            "-display", "none"]

PAUSE_TEXT = "migrate-pause is currently only supported during postcopy-active or postcopy-recover state"
RECOVER_TEXT = "Migrate recover can only be run when postcopy is paused."
START_TEXT = "Enable postcopy with migrate_set_capability before the start of migration"


def test_postcopy_commands_refuse_outside_postcopy(vms) -> None:
    src = vms("src", *MEMCHECK)
    dst = vms("dst", *MEMCHECK, "-incoming", "tcp:127.0.0.1:0")
    for vm in (src, dst):
        with pytest.raises(QmpFailed) as e:
            vm.cmd("migrate-pause")
        assert e.value.desc == PAUSE_TEXT
        with pytest.raises(QmpFailed) as e:
            vm.cmd("migrate-recover", uri="tcp:127.0.0.1:0")
        assert e.value.desc == RECOVER_TEXT
        with pytest.raises(QmpFailed) as e:
            vm.cmd("migrate-start-postcopy")
        assert e.value.desc == START_TEXT
    with pytest.raises(QmpFailed) as e:
        src.cmd("migrate-recover")
    assert e.value.desc == "Parameter 'uri' is missing"
    with pytest.raises(QmpFailed) as e:
        src.cmd("migrate", uri="tcp:127.0.0.1:1", resume=True)
    assert e.value.desc == "Cannot resume if there is no paused migration"
    # the commands are listed as QEMU lists them
    names = {c["name"] for c in src.cmd("query-commands")}
    assert {"migrate-start-postcopy", "migrate-pause", "migrate-recover"} <= names
    # and the VMs are untouched
    assert src.status() == "running"
    assert dst.status() == "inmigrate"
    assert "socket-address" in dst.cmd("query-migrate")


def test_hmp_postcopy_commands(vms) -> None:
    src = vms("src", *MEMCHECK)
    assert src.hmp("migrate_pause") == f"Error: {PAUSE_TEXT}\r\n"
    assert src.hmp("migrate_recover tcp:127.0.0.1:0") == f"Error: {RECOVER_TEXT}\r\n"
    assert src.hmp("migrate_start_postcopy") == f"Error: {START_TEXT}\r\n"
    helptext = src.hmp("help migrate_recover")
    assert "migrate_recover uri" in helptext and "Continue a paused incoming postcopy migration" in helptext
