"""Coverage-guided fuzzing of the migration stream decoder with atheris (``make fuzz``).

libFuzzer (through atheris) mutates real streams and keeps the inputs that reach new
code in the decoder (pyvm/migration/stream/, instrumented); each input is decoded in
process exactly as R1 does (tests/torture/suite.py ``_decode``).  A finding is any
exception other than the decoder's own MigrationError, an error report with raw
(unprintable) bytes, or -- with ``--checksum``, whose seed carries ``x-checksum`` -- an
input other than the seed that loads.  Seeds: a stream of a running memcheck guest (4 MiB)
saved by a real pyvm, with and without its pages cut down, so that executions stay fast.

    python -m tests.torture.fuzz_stream [--seconds N] [--checksum] [--corpus DIR]

Prints libFuzzer's figures (executions, coverage edges, corpus) and a one-line summary.
Not part of make test (it runs for minutes); needs the ``fuzz`` extra (atheris).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Nothing of pyvm is imported at the top: the worker must instrument the decoder's modules
# before anything imports them (atheris instruments a module only when it is first imported).
ROOT = Path(__file__).resolve().parent.parent.parent

#: where the inputs of findings are kept (git-ignored)
FINDINGS = ROOT / ".cache" / "fuzz-findings"

_JOB: dict[str, Any] = {}


def _one_input(data: bytes) -> None:
    from tests.torture import suite
    j = _JOB
    outcome, _ = suite._decode(data, j["vmdesc"], j["caps"], j["machine"], j["expected"])
    if j["checksum"] and outcome == "loaded" and hashlib.sha256(data).digest() not in j["seeds"]:
        raise AssertionError("an edited stream loaded although every section and page batch "
                             "carries a checksum")


def _seeds(tmp: Path, checksum: bool) -> list[bytes]:
    """A real stream, and the same stream cut after its first sections (smaller inputs
    reach the same code faster)."""
    from tests.stream_mutations import split_stream
    from tests.torture import suite
    with suite.launched():
        full = suite.saved_stream(tmp, checksum)
    split = split_stream(full)
    return [full, full[:split.sections[min(4, len(split.sections) - 1)].end]]


def _worker(corpus: Path, seconds: int, checksum: bool) -> None:
    """Fuzz (in this process; libFuzzer ends it when the time is up)."""
    import atheris
    # the decoder and everything it calls, instrumented for coverage before anyone imports it
    with atheris.instrument_imports(include=["pyvm.migration.stream"]):
        import pyvm.migration.stream.decoder  # noqa: F401
    from pyvm.analyze import find_vmdesc
    from tests.stream_mutations import split_stream
    seeds = sorted((f.read_bytes() for f in corpus.iterdir() if f.name.startswith("seed-")),
                   key=len, reverse=True)
    full = seeds[0]
    split = split_stream(full)
    _JOB.update(vmdesc=find_vmdesc(full), caps=["x-checksum"] if checksum else [],
                machine=full[13:13 + int.from_bytes(full[9:13], "big")].decode(),
                expected=sorted({(s.idstr, s.instance_id) for s in split.sections if s.opens}),
                checksum=checksum, seeds={hashlib.sha256(s).digest() for s in seeds})
    atheris.Setup([sys.argv[0], str(corpus), f"-max_total_time={seconds}",
                   f"-max_len={len(full)}", "-print_final_stats=1", "-rss_limit_mb=4096",
                   "-timeout=60", "-artifact_prefix=" + str(corpus.parent) + "/"], _one_input)
    atheris.Fuzz()


def _figures(output: str) -> dict[str, Any]:
    """libFuzzer's final figures: executions, speed, coverage edges and features, corpus."""
    out: dict[str, Any] = {}
    for line in output.splitlines():
        if line.startswith("stat::"):
            key, _, value = line[len("stat::"):].partition(":")
            out[key.strip()] = int(value.strip())
        elif line.startswith("#") and "cov:" in line.split():
            words = line.split()
            for name in ("cov:", "ft:", "corp:"):
                if name in words:
                    out[name.rstrip(":")] = words[words.index(name) + 1]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="coverage-guided fuzzing of the stream decoder")
    p.add_argument("--seconds", type=int, default=300, help="how long to fuzz (default 300)")
    p.add_argument("--checksum", action="store_true",
                   help="seed with an x-checksum stream: nothing but the seed may load")
    p.add_argument("--worker", metavar="CORPUS", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        _worker(Path(args.worker), args.seconds, args.checksum)
        return 0
    with tempfile.TemporaryDirectory(prefix="pyvm-fuzz-") as d:
        tmp = Path(d)
        seeds = _seeds(tmp, args.checksum)
        corpus = tmp / "corpus"
        corpus.mkdir()
        for i, seed in enumerate(seeds):
            (corpus / f"seed-{i}").write_bytes(seed)
        print(f"seeds: {[len(s) for s in seeds]} bytes; fuzzing for {args.seconds} s",
              flush=True)
        start = time.monotonic()
        cmd = [sys.executable, "-m", "tests.torture.fuzz_stream", "--worker", str(corpus),
               "--seconds", str(args.seconds)] + (["--checksum"] if args.checksum else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                              timeout=args.seconds + 600)
        elapsed = time.monotonic() - start
        output = proc.stdout + proc.stderr
        crashes = sorted(f.name for f in tmp.iterdir() if f.name.startswith(("crash-", "oom-",
                                                                               "timeout-")))
        if crashes:                          # kept for the report: the temp dir goes away
            FINDINGS.mkdir(parents=True, exist_ok=True)
            for name in crashes:
                (FINDINGS / name).write_bytes((tmp / name).read_bytes())
                for i, seed in enumerate(seeds):
                    (FINDINGS / f"{name}.seed-{i}").write_bytes(seed)
                (FINDINGS / f"{name}.log").write_text(output)
        figures = {**_figures(output), "seconds": round(elapsed), "checksum": args.checksum,
                   "exit": proc.returncode, "findings": crashes,
                   "corpus_files": len(list(corpus.iterdir()))}
        print("fuzz: " + json.dumps(figures), flush=True)
        if proc.returncode != 0 or crashes:
            print(output[-6000:], file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
