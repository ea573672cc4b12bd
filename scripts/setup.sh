#!/usr/bin/env bash
# Sets up a fresh Debian machine for pyvm: the Debian packages the build and the tests
# need, a virtual environment in .venv, pyvm itself (editable, which compiles the Cython
# extension) and the test tools.  Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

DEBS="python3-venv python3-dev gcc make binutils pkg-config libfabric-dev openssl iproute2"
missing=""
for p in $DEBS; do
    dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "setup: installing Debian packages:$missing"
    SUDO=""
    [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PY" -m venv .venv
fi
stamp=.venv/.pyvm-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ] \
   || [ pyvm/_fastpath.pyx -nt "$stamp" ] || [ pyvm/_pagestream.pyx -nt "$stamp" ] \
   || [ pyvm/_xbzrle.pyx -nt "$stamp" ] \
   || [ pyvm/_delivery.pyx -nt "$stamp" ] || [ pyvm/_portio.pyx -nt "$stamp" ] \
   || [ pyvm/_pic.pyx -nt "$stamp" ] || [ pyvm/_pit.pyx -nt "$stamp" ] || [ pyvm/_idle.pyx -nt "$stamp" ] \
   || [ pyvm/_uart.pyx -nt "$stamp" ] || [ pyvm/_tlbtrack.pyx -nt "$stamp" ] \
   || [ pyvm/_kernels.h -nt "$stamp" ] || [ pyvm/migration/transports/_fabric.pyx -nt "$stamp" ]; then
    echo "setup: installing pyvm and its dependencies into .venv"
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[test]'
    touch "$stamp"
fi
.venv/bin/python -c "import pyvm.fastpath as f; print('setup: pyvm ready, fast path:', f.IMPLEMENTATION)"
# QEMU's scripts/analyze-migration.py for the stream-compatibility tests (warns and goes on offline)
.venv/bin/python scripts/fetch_qemu_analyzer.py
