"""The tree's static rules, run as tests so `make test` (and CI) enforces them.

- the import contracts in pyproject.toml (``[tool.importlinter]``): no import cycles, the
  layers cli/analyze -> migration -> machine | qmp -> cpu/devices -> core, migration's
  control above its stream format and transports, devices never reaching migration;
- ``mypy --strict`` on the whole ``pyvm`` package (``[tool.mypy]``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_import_contracts_are_kept() -> None:
    proc = _run(str(BIN / "lint-imports"), "--no-cache")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


@pytest.mark.slow
def test_mypy_strict_is_clean() -> None:
    proc = _run(sys.executable, "-m", "mypy", "pyvm")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "Success: no issues found" in proc.stdout
