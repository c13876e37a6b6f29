"""A test CA with a server certificate for 127.0.0.1 and two client certificates, made with openssl."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pki:
    """A test CA, a server certificate for 127.0.0.1 and two client certificates: one the CA signed,
    one self-signed (a stranger's)."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_cert: Path
    stranger_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_pki(folder: Path) -> Pki:
    """The CA, the certificates and their keys, in ``folder``."""
    ca, ca_key = folder / "ca.pem", folder / "ca-key.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
             "-subj", "/CN=Test Hospital CA")
    for name, cn, san in (("server", "radvlm", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
                          ("client", "PACS", "subjectAltName=DNS:pacs.example")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(folder / f"{name}-key.pem"),
                 "-out", str(folder / f"{name}.csr"), "-subj", f"/CN={cn}")
        (folder / f"{name}.ext").write_text(san + "\n")
        _openssl("x509", "-req", "-in", str(folder / f"{name}.csr"), "-CA", str(ca), "-CAkey", str(ca_key),
                 "-CAcreateserial", "-out", str(folder / f"{name}.pem"), "-days", "2",
                 "-extfile", str(folder / f"{name}.ext"))
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(folder / "stranger-key.pem"),
             "-out", str(folder / "stranger.pem"), "-days", "2", "-subj", "/CN=stranger")
    return Pki(ca=ca, server_cert=folder / "server.pem", server_key=folder / "server-key.pem",
               client_cert=folder / "client.pem", client_key=folder / "client-key.pem",
               stranger_cert=folder / "stranger.pem", stranger_key=folder / "stranger-key.pem")
