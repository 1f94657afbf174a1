"""Test certificates made with the openssl CLI: a CA, a server certificate and client certificates."""

from __future__ import annotations

import subprocess
from pathlib import Path


def make_pki(directory: Path, *, server_names: str = "IP:127.0.0.1", clients: tuple[str, ...] = ("client",),
             ca_name: str = "flowship-test-ca") -> dict[str, Path]:
    """``ca.crt``/``ca.key``, ``server.crt``/``server.key`` for the subjectAltName ``server_names`` and
    ``<cn>.crt``/``<cn>.key`` per client CN, by file name."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", f"/CN={ca_name}")
    names = [("server", f"subjectAltName={server_names}")] + [(c, "extendedKeyUsage=clientAuth") for c in clients]
    for name, ext in names:
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN={name}")
        (directory / f"{name}.ext").write_text(ext + "\n")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext")
    return {p.name: p for p in directory.iterdir()}
