"""Shared test helpers: start real pyvm processes and find the packaged guests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# Hypothesis' per-example deadline (200 ms) is a timing check, not a property: on two
# shared cores under a full test run one example can take longer and fail as "flaky".
# The properties are what these tests assert; pytest-timeout still ends a hung test.
settings.register_profile("pyvm", deadline=None)
settings.load_profile("pyvm")

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "pyvm" / "guests"
DEBUG_EXIT = ["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]


def guest(name: str) -> str:
    path = GUESTS / name
    assert path.exists(), f"missing guest image {path}: run make -C firmware"
    return str(path)


def pyvm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pyvm", *args]


def run_pyvm(*args: str, timeout: float = 30, input: bytes | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    if env:
        e.update(env)
    return subprocess.run(pyvm_cmd(*args), capture_output=True, timeout=timeout, input=input,
                          env=e, cwd=ROOT)


@pytest.fixture
def tmp_shm(tmp_path: Path):
    """A directory on /dev/shm (shared-memory backends), removed afterwards."""
    import shutil
    import tempfile
    base = "/dev/shm" if os.path.isdir("/dev/shm") else str(tmp_path)
    d = tempfile.mkdtemp(prefix="pyvm-test-", dir=base)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    """A test CA with server, client and other-CA credential directories (tests/pki.py)."""
    from tests.pki import make_pki
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def vms(tmp_path: Path):
    """Start real pyvm processes driven over QMP; all are killed at the end of the test."""
    from tests.vmproc import VmProcess

    started: list[VmProcess] = []

    def start(name: str, *args: str, **kw) -> VmProcess:
        vm = VmProcess(tmp_path, name, *args, **kw)
        started.append(vm)
        return vm
    yield start
    for vm in started:
        vm.close()


def pytest_terminal_summary(terminalreporter, config) -> None:  # type: ignore[no-untyped-def]
    """Print pytest-randomly's seed even under -q, so a failing order can be replayed."""
    seed = getattr(config.option, "randomly_seed", None)
    if isinstance(seed, int):
        terminalreporter.write_line(f"test order: --randomly-seed={seed}")
