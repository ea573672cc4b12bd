#!/usr/bin/env python3
"""Fetch QEMU's scripts/analyze-migration.py from Debian's ``qemu`` source package.

The test suite checks that QEMU's own stream analyzer reads every stream pyvm writes. That
script is not shipped by any Debian binary package and is not kept in this repository, so this
tool takes it from the upstream tarball (``qemu_<version>.orig.tar.xz``) of the ``qemu``
source package, from the archive this machine's apt is configured with (so it follows the
machine's mirror and proxy; no archive host is written here):

1. with ``deb-src`` entries configured, ``apt-get source --download-only --print-uris qemu``
   names the tarball and its SHA256;
2. otherwise the ``deb`` archives of apt's sources lists (``Dir::Etc::sourcelist`` and
   ``sourceparts``, one-line and deb822 forms) are asked for
   ``dists/<suite>/main/source/Sources.xz`` (trixie first, then bookworm), whose
   ``Package: qemu`` paragraph gives the ``Directory`` and the ``*.orig.tar.xz`` entry of
   ``Checksums-Sha256``;
3. the tarball is streamed (never stored whole), every byte hashed, and only
   ``*/scripts/analyze-migration.py`` kept; the file is installed only if the SHA256 matches.

apt's ``Acquire::http::Proxy`` is used when it is set.

Result: ``.cache/qemu/analyze-migration.py`` and ``.cache/qemu/VERSION`` (the Debian version).
Nothing happens when the file is already there, unless ``--force``. Network failures print one
warning line to stderr and exit 0, so an offline setup still succeeds.

Usage: python3 scripts/fetch_qemu_analyzer.py [--force] [--suite SUITE]
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import http.client
import lzma
import os
import re
import shlex
import subprocess
import sys
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

SUITES = ("trixie", "bookworm")
MEMBER_SUFFIX = "/scripts/analyze-migration.py"
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "qemu"
TIMEOUT = 60.0


class FetchError(Exception):
    """The archive could not be read or did not hold what was expected."""


def _apt_config(*names: str) -> dict[str, str]:
    """Values of apt configuration items (``apt-config shell``); missing ones are absent."""
    args: list[str] = []
    for i, name in enumerate(names):
        args += [f"V{i}", name]
    try:
        out = subprocess.run(["apt-config", "shell", *args], capture_output=True, text=True,
                             timeout=30, check=False).stdout
    except OSError:
        return {}
    values: dict[str, str] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.startswith("V") and key[1:].isdigit():
            values[names[int(key[1:])]] = shlex.split(value)[0] if value else ""
    return values


def _opener() -> urllib.request.OpenerDirector:
    """urllib through apt's HTTP proxy when one is configured (else the environment's)."""
    proxy = _apt_config("Acquire::http::Proxy").get("Acquire::http::Proxy", "")
    if proxy and proxy.upper() != "DIRECT":
        return urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy,
                                                                        "https": proxy}))
    return urllib.request.build_opener()


def _source_files() -> list[str]:
    conf = _apt_config("Dir::Etc::sourcelist/f", "Dir::Etc::sourceparts/d")
    files = [conf.get("Dir::Etc::sourcelist/f", "/etc/apt/sources.list")]
    parts = conf.get("Dir::Etc::sourceparts/d", "/etc/apt/sources.list.d/")
    files += sorted(glob.glob(os.path.join(parts, "*.list")))
    files += sorted(glob.glob(os.path.join(parts, "*.sources")))
    return [f for f in files if os.path.isfile(f)]


def apt_archives() -> list[str]:
    """The ``deb``/``deb-src`` archive URIs in this machine's apt sources lists, in order."""
    uris: list[str] = []
    for path in _source_files():
        text = Path(path).read_text(errors="replace")
        if path.endswith(".sources"):                       # deb822 stanzas
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^([A-Za-z-]+):[ \t]*(.*)$", stanza, re.M))
                if fields.get("Enabled", "yes").lower() == "no":
                    continue
                if {"deb", "deb-src"} & set(fields.get("Types", "").split()):
                    uris += fields.get("URIs", "").split()
        else:                                               # one-line entries
            for line in text.splitlines():
                words = line.split("#", 1)[0].split()
                if words and words[0] in ("deb", "deb-src"):
                    rest = words[1:]
                    if rest and rest[0].startswith("["):    # [ options ]
                        while rest and not rest[0].endswith("]"):
                            rest = rest[1:]
                        rest = rest[1:]
                    if rest:
                        uris.append(rest[0])
    seen: list[str] = []
    for uri in uris:
        uri = uri.rstrip("/")
        if uri.startswith(("http://", "https://")) and uri not in seen:
            seen.append(uri)
    return seen


def apt_source_tarball() -> tuple[str, str, str] | None:
    """(version, URL, SHA256) of qemu's orig tarball from ``apt-get source --print-uris``;
    None when apt has no ``deb-src`` entry for it."""
    try:
        proc = subprocess.run(["apt-get", "source", "--download-only", "--print-uris", "qemu"],
                              capture_output=True, text=True, timeout=120, check=False)
    except OSError:
        return None
    version = tarball = sha256 = None
    for line in proc.stdout.splitlines():
        m = re.match(r"^'([^']+)' (\S+) \d+ (?:SHA256:)?([0-9a-f]{64})$", line.strip())
        if not m:
            continue
        url, name, digest = m.groups()
        if name.endswith(".dsc"):
            version = name[len("qemu_"):-len(".dsc")]
        elif name.endswith(".orig.tar.xz"):
            tarball, sha256 = url, digest
    if proc.returncode != 0 or tarball is None or sha256 is None:
        return None
    return version or "?", tarball, sha256


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


def qemu_source_entry(archive: str, suite: str) -> tuple[str, str, str, str]:
    """(Debian version, pool directory, orig tarball name, its SHA256) of ``qemu`` in ``suite``."""
    url = f"{archive}/dists/{suite}/main/source/Sources.xz"
    with _opener().open(url, timeout=TIMEOUT) as resp:
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
    with _opener().open(url, timeout=TIMEOUT) as resp:
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


_ERRORS = (OSError, EOFError, http.client.HTTPException, lzma.LZMAError, tarfile.TarError,
           FetchError, KeyError)


def _install(dest: Path, script: bytes, version: str, origin: str) -> str:
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / "analyze-migration.py.tmp"
    tmp.write_bytes(script)
    tmp.replace(dest / "analyze-migration.py")
    (dest / "VERSION").write_text(f"{version} ({origin})\n")
    return version


def fetch(suites: tuple[str, ...], dest: Path, use_deb_src: bool = True) -> str:
    """Install the script into ``dest``; returns the Debian version it came from."""
    errors: list[str] = []
    found = apt_source_tarball() if use_deb_src else None
    if found is not None:
        version, url, sha256 = found
        try:
            return _install(dest, extract_analyzer(url, sha256), version, "apt-get source")
        except _ERRORS as err:
            errors.append(f"apt-get source: {err}")
    archives = apt_archives()
    if not archives:
        errors.append("apt's sources lists name no http(s) archive")
    for suite in suites:
        for archive in archives:
            try:
                version, directory, tarball, sha256 = qemu_source_entry(archive, suite)
                script = extract_analyzer(f"{archive}/{directory}/{tarball}", sha256)
            except _ERRORS as err:
                errors.append(f"{suite}: {err}")
                continue
            return _install(dest, script, version, suite)
    raise FetchError("; ".join(errors))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--force", action="store_true", help="download again even if present")
    parser.add_argument("--suite", help="Debian suite to read when apt has no deb-src entry "
                        "(default: trixie, then bookworm)")
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
