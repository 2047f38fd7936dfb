"""The TLS context `ntonix serve` terminates client connections with.

Mozilla's "intermediate" profile (server-side TLS guidelines 6.0): TLS 1.2 and 1.3, ECDHE with
AES-GCM or ChaCha20 only. Hypercorn's own context (what the plain `hypercorn --certfile` command
uses) also refuses TLS 1.0/1.1, but offers no ChaCha20 on TLS 1.2 and clears OpenSSL's option
mask down to OP_NO_COMPRESSION (losing the OP_ALL interoperability workarounds with it).
"""

from __future__ import annotations

import ssl

# Mozilla intermediate, TLS 1.2 suites, in Mozilla's order. TLS 1.3 suites cannot be set from
# Python's ssl module; OpenSSL's defaults (AES-256-GCM, ChaCha20, AES-128-GCM) are exactly
# Mozilla's three. Every suite here is an AEAD with forward secrecy, as HTTP/2 requires
# (RFC 9113 section 9.2.2).
MOZILLA_INTERMEDIATE_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
ALPN_PROTOCOLS = ["h2", "http/1.1"]


def server_ssl_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """A server context for `certfile` (PEM, leaf first, then intermediates) and `keyfile`.

    Raises OSError (a missing file) or ssl.SSLError (a key that does not match, say).
    """
    # Not create_default_context(): that would also load the system CAs, which a server that
    # does not ask for client certificates never uses. The SSLContext defaults are kept
    # (OP_ALL workarounds, no SSLv3, SECLEVEL=2: RSA keys of 2048 bits or more).
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(MOZILLA_INTERMEDIATE_CIPHERS)
    # CRIME; HTTP/2 forbids TLS compression outright (RFC 9113 section 9.2.1).
    context.options |= ssl.OP_NO_COMPRESSION
    # Mozilla (guidelines 5.0 onwards, "server_preferred_order": false) lets the client choose:
    # every suite offered is strong, and a client without AES hardware, a phone say, knows to
    # put ChaCha20 first. Python's default turns server preference on, so clear it.
    context.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    # Key exchange groups stay OpenSSL's defaults (X25519, P-256, P-384, ...), a superset of
    # Mozilla's list: Python 3.11 can only pin a single curve.
    context.set_alpn_protocols(ALPN_PROTOCOLS)
    context.load_cert_chain(certfile, keyfile)
    return context
