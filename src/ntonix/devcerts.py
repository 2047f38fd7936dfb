"""Development certificates: a local CA and a server certificate for localhost, made by trustme.

Used by `ntonix demo --tls` (in a temporary directory) and by `nox -s certs` (in ./certs/),
which runs this file as a script with only trustme installed, hence the stdlib-only imports.
Never for production: the CA's private key is never written, so nothing else can be signed
with it, but whoever trusts ca.pem trusts this server certificate (valid until 3000).

trustme (and the `cryptography` it pulls in) is the `demo` extra, not a dependency of the
gateway: a deployment brings its own certificates and should not carry a certificate factory.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

# What the server certificate is valid for: the demo and `ntonix serve` bind 127.0.0.1 by default.
HOSTS = ("localhost", "127.0.0.1", "::1")


class DevCerts(NamedTuple):
    ca: Path  # the CA certificate a client trusts (curl --cacert)
    certfile: Path  # the server certificate, then the chain (--certfile)
    keyfile: Path  # the server's private key, readable by its owner only (--keyfile)


def write_dev_certs(directory: Path) -> DevCerts:
    """Make a fresh CA and a server certificate for HOSTS; write them into `directory`."""
    try:
        import trustme
    except ImportError:
        raise RuntimeError(
            "development certificates need trustme: pip install 'ntonix[demo]'"
        ) from None
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="ntonix development CA")
    server = ca.issue_cert(*HOSTS)
    certs = DevCerts(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    ca.cert_pem.write_to_path(certs.ca)
    # Owner-only before the key is in it (touch's mode applies only to a new file).
    certs.keyfile.touch(mode=0o600)
    certs.keyfile.chmod(0o600)
    server.private_key_pem.write_to_path(certs.keyfile)
    certs.certfile.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    return certs


if __name__ == "__main__":
    written = write_dev_certs(Path(sys.argv[1] if len(sys.argv) > 1 else "certs"))
    print(f"wrote {written.ca} (the CA to trust), {written.certfile} and {written.keyfile}")
