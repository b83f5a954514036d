"""Test certificates made with the openssl CLI: a CA and certificates it signs."""

from __future__ import annotations

import subprocess
from pathlib import Path


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_ca(cwd: Path, name: str = "ca", subject: str = "test CA") -> None:
    """{name}.key and a self-signed {name}.pem in cwd."""
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=cwd)
    openssl("req", "-new", "-x509", "-key", f"{name}.key", "-subj", f"/CN={subject}", "-days", "2",
            "-out", f"{name}.pem", cwd=cwd)  # fmt: skip


def issue(name: str, subject: str, ext: str, cwd: Path, ca: str = "ca") -> None:
    """{name}.key and {name}.pem signed by {ca}.pem, with the x509 extensions in `ext`."""
    openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key", cwd=cwd)
    openssl("req", "-new", "-key", f"{name}.key", "-subj", f"/CN={subject}", "-out", f"{name}.csr", cwd=cwd)
    (cwd / f"{name}.ext").write_text(ext + "\n")
    openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=cwd,
    )  # fmt: skip
