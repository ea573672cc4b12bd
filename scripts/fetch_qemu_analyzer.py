#!/usr/bin/env python3
"""Fetch QEMU's scripts/analyze-migration.py from Debian's ``qemu`` source package.

The test suite checks that QEMU's own stream analyzer reads every stream pyvm writes. That
script is not shipped by any Debian binary package and is not kept in this repository, so this
tool takes it from the upstream tarball (``qemu_<version>.orig.tar.xz``) of the ``qemu``
source package in Debian's archive:

1. read ``dists/<suite>/main/source/Sources.xz`` (trixie first, then bookworm);
2. find the ``Package: qemu`` paragraph, its ``Directory`` and the ``*.orig.tar.xz`` entry of
   ``Checksums-Sha256``;
3. stream the tarball (never stored whole), hashing every byte, and keep only
   ``*/scripts/analyze-migration.py``; the file is installed only if the SHA256 matches.

Result: ``.cache/qemu/analyze-migration.py`` and ``.cache/qemu/VERSION`` (the Debian version).
Nothing happens when the file is already there, unless ``--force``. Network failures print one
warning line to stderr and exit 0, so an offline setup still succeeds.

Usage: python3 scripts/fetch_qemu_analyzer.py [--force] [--suite SUITE]
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import lzma
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

MIRROR = "http://deb.debian.org/debian"
SUITES = ("trixie", "bookworm")
MEMBER_SUFFIX = "/scripts/analyze-migration.py"
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "qemu"
TIMEOUT = 60.0


class FetchError(Exception):
    """The archive could not be read or did not hold what was expected."""


class HashingReader:
    """A read-only file object that feeds every byte it passes on into a SHA256."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.sha256.update(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def qemu_source_entry(suite: str) -> tuple[str, str, str, str]:
    """(Debian version, pool directory, orig tarball name, its SHA256) of ``qemu`` in ``suite``."""
    url = f"{MIRROR}/dists/{suite}/main/source/Sources.xz"
    with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
        text = lzma.decompress(resp.read()).decode("utf-8", errors="replace")
    for paragraph in text.split("\n\n"):
        if not paragraph.startswith("Package: qemu\n"):
            continue
        fields: dict[str, str] = {}
        key = ""
        for line in paragraph.splitlines():
            if line.startswith((" ", "\t")) and key:
                fields[key] += "\n" + line.strip()
            elif ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        for entry in fields.get("Checksums-Sha256", "").splitlines():
            parts = entry.split()
            if len(parts) == 3 and parts[2].endswith(".orig.tar.xz"):
                return fields["Version"], fields["Directory"], parts[2], parts[0]
        raise FetchError(f"{suite}: qemu has no .orig.tar.xz in Checksums-Sha256")
    raise FetchError(f"{suite}: no qemu source package in {url}")


def extract_analyzer(url: str, sha256: str) -> bytes:
    """Stream the tarball at ``url``; return the script once the whole file's SHA256 is checked."""
    script: bytes | None = None
    with urllib.request.urlopen(url, timeout=TIMEOUT) as resp:
        reader = HashingReader(resp)
        with tarfile.open(fileobj=reader, mode="r|xz") as tar:   # type: ignore[call-overload]
            for member in tar:
                if member.isfile() and member.name.endswith(MEMBER_SUFFIX) and script is None:
                    f = tar.extractfile(member)
                    if f is not None:
                        script = f.read()
        reader.drain()                  # the hash covers the whole file, tar padding included
    if reader.sha256.hexdigest() != sha256:
        raise FetchError(f"SHA256 mismatch for {url}")
    if script is None:
        raise FetchError(f"no *{MEMBER_SUFFIX} in {url}")
    return script


def fetch(suites: tuple[str, ...], dest: Path) -> str:
    """Install the script into ``dest``; returns the Debian version it came from."""
    errors: list[str] = []
    for suite in suites:
        try:
            version, directory, tarball, sha256 = qemu_source_entry(suite)
            script = extract_analyzer(f"{MIRROR}/{directory}/{tarball}", sha256)
        except (OSError, EOFError, http.client.HTTPException, lzma.LZMAError, tarfile.TarError,
                FetchError, KeyError) as err:
            errors.append(f"{suite}: {err}")
            continue
        dest.mkdir(parents=True, exist_ok=True)
        tmp = dest / "analyze-migration.py.tmp"
        tmp.write_bytes(script)
        tmp.replace(dest / "analyze-migration.py")
        (dest / "VERSION").write_text(f"{version} ({suite})\n")
        return version
    raise FetchError("; ".join(errors))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--force", action="store_true", help="download again even if present")
    parser.add_argument("--suite", help="Debian suite to read (default: trixie, then bookworm)")
    args = parser.parse_args(argv)
    target = CACHE / "analyze-migration.py"
    if target.exists() and not args.force:
        print(f"fetch_qemu_analyzer: {target} already present")
        return 0
    suites = (args.suite,) if args.suite else SUITES
    try:
        version = fetch(suites, CACHE)
    except FetchError as err:
        print(f"fetch_qemu_analyzer: WARNING: could not fetch QEMU's analyze-migration.py "
              f"({err}); the tests that use it will be skipped", file=sys.stderr)
        return 0
    print(f"fetch_qemu_analyzer: {target} from Debian qemu {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
