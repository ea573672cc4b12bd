# pyvm: the two commands a newcomer needs are `make demo` and `make test`.
# Both set up everything first (Debian packages, .venv, the Cython extension).

PY := .venv/bin/python

.PHONY: setup demo test test-validate test-postcopy test-fast test-pure test-linux linux torture torture-linux fuzz lint firmware firmware-check bench bench-lab bench-linux bench-migration mypy clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m pytest -q -m "not validate and not postcopy_full" tests

# The postcopy end-to-end runs too heavy for make test (about a minute).
test-postcopy: setup
	$(PY) -m pytest -q -m postcopy_full tests

# pyvm-lab validate on a real VM against its simulation (timing-sensitive: a quiet machine).
test-validate: setup
	$(PY) -m pytest -q -m validate tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

test-pure: setup
	$(PY) -m pytest -q tests/e2e/test_pure_python.py

test-linux: setup
	$(PY) -m pytest -q -m linux tests

# Debian 12's kernel and busybox (apt-get download, cached in ~/.cache/pyvm/linux), booted on
# this terminal: the serial console is stdio (Ctrl-A x quits).
linux: setup
	.venv/bin/pyvm-linux-guest --boot

# The standing adversarial suite at full size (docs/reliability.md, Figures).
torture: setup
	$(PY) -m tests.torture.suite

# Coverage-guided fuzzing of the stream decoder with atheris, 5 minutes without and 5 with
# x-checksum (docs/reliability.md, Figures); not part of make test.
fuzz: setup
	$(PY) -m pip install -q -e '.[fuzz]'
	$(PY) -m tests.torture.fuzz_stream --seconds 300
	$(PY) -m tests.torture.fuzz_stream --seconds 300 --checksum

# R4 with Debian's Linux guest: 10 live migrations at the shell prompt (about 5 minutes).
torture-linux: setup
	$(PY) -m tests.torture.suite r4l

firmware:
	$(MAKE) -C firmware

firmware-check:
	$(MAKE) -C firmware check

# Installs Debian's qemu-system-x86 (the baseline) when missing; not part of make test.
bench-linux: setup
	$(PY) bench/linux_boot.py
	$(PY) bench/linux_migration.py

mypy: setup
	$(PY) -m mypy pyvm

# The static rules on their own (make test runs them too, tests/unit/test_static_checks.py):
# mypy --strict on pyvm/ and the import contracts of pyproject.toml.
lint: setup
	$(PY) -m mypy pyvm
	.venv/bin/lint-imports

bench: setup
	$(PY) bench/dirty_tracking.py
	$(PY) bench/zero_scan.py
	$(PY) bench/page_load.py

# The migration figures of docs/performance.md (QEMU 7.2 cases need qemu-system-x86_64;
# about an hour on 2 cores): multifd/mapped-ram at 1 GiB, xbzrle, the hot-guest table.
bench-migration: setup
	$(PY) bench/migration.py --multifd --qemu --file --size-mib 1024 --repeat 2
	$(PY) bench/xbzrle_mapped_ram.py --cases xbzrle,save,live
	$(PY) bench/convergence.py --hot --budget 30 --link-mib 3

bench-lab: setup
	$(PY) bench/lab_sweep.py --migrations 10000

clean:
	rm -rf build .venv pyvm/_fastpath.c pyvm/_pagestream.c pyvm/_xbzrle.c pyvm/_delivery.c pyvm/_portio.c pyvm/_pic.c pyvm/_pit.c pyvm/_idle.c pyvm/_uart.c pyvm/*.so
