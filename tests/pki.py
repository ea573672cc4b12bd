"""A throwaway X.509 PKI made with the openssl command (TLS tests)."""

from __future__ import annotations

import subprocess
from pathlib import Path

CLIENT_SUBJECT = "/C=GB/O=pyvm test/CN=client.example.com"
#: the client's distinguished name as GnuTLS (and authz-simple) spells it
CLIENT_DN = "CN=client.example.com,O=pyvm test,C=GB"
OTHER_SUBJECT = "/C=GB/O=pyvm test/CN=intruder.example.com"

_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _run(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    _run("req", "-x509", *_KEY, "-keyout", f"{name}-key.pem", "-out", f"{name}-cert.pem",
         "-days", "2", "-subj", f"/CN=pyvm test {name}",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def _leaf(d: Path, ca: str, name: str, subject: str, usage: str, san: str | None) -> None:
    ext = d / f"{name}.ext"
    lines = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature",
             f"extendedKeyUsage={usage}", "subjectKeyIdentifier=hash",
             "authorityKeyIdentifier=keyid"]
    if san:
        lines.append(f"subjectAltName={san}")
    ext.write_text("\n".join(lines) + "\n")
    _run("req", *_KEY, "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", "-subj", subject, cwd=d)
    _run("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}-cert.pem", "-CAkey", f"{ca}-key.pem",
         "-CAcreateserial", "-out", f"{name}-cert.pem", "-days", "2", "-extfile", ext.name, cwd=d)


def _creds_dir(root: Path, name: str, files: dict[str, str]) -> Path:
    out = root / name
    out.mkdir()
    for target, source in files.items():
        (out / target).write_bytes((root / source).read_bytes())
    return out


def make_pki(root: Path) -> dict[str, Path]:
    """Credential directories in QEMU's layout: ``server``, ``client`` (the allowed one),
    ``other`` (valid but another name), ``rogue`` (signed by an unknown CA), ``nocert``."""
    work = root / "work"
    work.mkdir()
    _ca(work, "ca")
    _ca(work, "rogueca")
    _leaf(work, "ca", "server", "/CN=localhost", "serverAuth", "DNS:localhost,IP:127.0.0.1")
    _leaf(work, "ca", "client", CLIENT_SUBJECT, "clientAuth", None)
    _leaf(work, "ca", "other", OTHER_SUBJECT, "clientAuth", None)
    _leaf(work, "rogueca", "rogue", CLIENT_SUBJECT, "clientAuth", None)
    dirs = {
        "server": _creds_dir(root, "server", {"ca-cert.pem": "work/ca-cert.pem",
                                              "server-cert.pem": "work/server-cert.pem",
                                              "server-key.pem": "work/server-key.pem"}),
        "nocert": _creds_dir(root, "nocert", {"ca-cert.pem": "work/ca-cert.pem"}),
    }
    for name in ("client", "other", "rogue"):
        dirs[name] = _creds_dir(root, name, {"ca-cert.pem": "work/ca-cert.pem",
                                             "client-cert.pem": f"work/{name}-cert.pem",
                                             "client-key.pem": f"work/{name}-key.pem"})
    return dirs
