# pyvm: the two commands a newcomer needs are `make demo` and `make test`.
# Both set up everything first (Debian packages, .venv, the Cython extension).

PY := .venv/bin/python

.PHONY: setup demo test test-fast torture firmware firmware-check bench mypy clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

# The standing adversarial suite at full size (docs/reliability.md); about 15 minutes.
torture: setup
	$(PY) -m tests.torture.suite

firmware:
	$(MAKE) -C firmware

firmware-check:
	$(MAKE) -C firmware check

mypy: setup
	$(PY) -m mypy pyvm

bench: setup
	$(PY) bench/dirty_tracking.py
	$(PY) bench/zero_scan.py
	$(PY) bench/page_load.py

clean:
	rm -rf build .venv pyvm/_fastpath.c pyvm/_pagestream.c pyvm/*.so
